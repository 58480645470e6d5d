"""A tiny random Llama (HF folder) that vLLM, SGLang and transformers load offline.

``build_tiny_llama(path)`` writes ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32) and a byte-level BPE tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``) into ``path``.

Default shape: 2 layers, hidden 128, 4 query heads / 2 KV heads (head_dim 32),
SwiGLU 256, vocab 384, ``max_position_embeddings`` 256, ``rope_theta`` 10000,
untied embeddings. The query/key projections are scaled up so attention is
clearly peaked (a random 0.02-std init gives near-uniform attention, which
would hide position bugs), and the LM head is scaled so next-token
distributions are not flat (fewer near-ties for greedy decoding).

Tokenizer: ids 0..2 are ``<unk>``, ``<s>`` (bos), ``</s>`` (eos); 3..258 are the
256 byte-level symbols, so *any* text encodes; the rest are BPE merges learnt
from a fixed built-in text. Encoding prepends ``<s>`` (like Llama tokenizers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

VOCAB_SIZE = 384
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

TINY_LLAMA_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

# Weight scales (std of the normal init) chosen for peaked attention/logits.
QK_STD = 0.12  # 6x the usual 0.02
LM_HEAD_STD = 0.25
VO_STD = 0.15  # attention output comparable to the embedding: history matters

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Attention sinks keep the first tokens
of a stream in the cache forever, and a sliding window keeps the most recent ones.
In the beginning was the word, and the word was with the model, and the model
streamed on and on, far past the end of its context window, without forgetting how
to speak. Once upon a time there was a small language model that lived in a cache
of blocks; every block held sixteen or thirty-two tokens, and when the window moved
on, the old blocks went back to the pool. 0123456789 + - * / = ( ) [ ] { } < > " ' ,
def main(): return sum(x * x for x in range(10))  # numbers, code and prose
"""


def build_tokenizer(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE):
    """Train (deterministically) and save a byte-level BPE tokenizer; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # Top up with unused placeholder tokens if the corpus ran out of merges.
    while tok.get_vocab_size() < vocab_size:
        tok.add_tokens([f"<extra_{tok.get_vocab_size()}>"])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=TINY_LLAMA_CONFIG["max_position_embeddings"])
    fast.save_pretrained(str(path))
    # The class name older transformers (4.x, e.g. an SGLang venv) also know.
    cfg_path = Path(path) / "tokenizer_config.json"
    data = json.loads(cfg_path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return fast


def build_tiny_llama(path: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """Write a tiny random ``LlamaForCausalLM`` folder at ``path``; returns ``str(path)``.

    ``overrides`` replace entries of ``TINY_LLAMA_CONFIG`` (e.g. ``num_hidden_layers=1``,
    ``tie_word_embeddings=True``, ``max_position_embeddings=128``), plus the special
    keys ``qk_std`` and ``lm_head_std``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build_llama_like(path, seed, overrides, LlamaConfig, LlamaForCausalLM)


def build_tiny_qwen3(path: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """A tiny random ``Qwen3ForCausalLM``: the Llama shape plus per-head q/k RMSNorm
    before RoPE, with norm weights far from 1 (0.4-1.6) so a skipped norm shows."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build_llama_like(path, seed, overrides, Qwen3Config, Qwen3ForCausalLM,
                             extra=dict(attention_bias=False, use_sliding_window=False))


def _build_llama_like(path, seed, overrides, config_cls, model_cls, extra=None) -> str:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    qk_std = overrides.pop("qk_std", QK_STD)
    lm_head_std = overrides.pop("lm_head_std", LM_HEAD_STD)
    vo_std = overrides.pop("vo_std", VO_STD)
    cfg = {**TINY_LLAMA_CONFIG, **(extra or {}), **overrides}
    theta = cfg.pop("rope_theta")
    config = config_cls(**cfg, rope_parameters={"rope_type": "default", "rope_theta": theta},
                        dtype="float32", architectures=[model_cls.__name__])
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    model = model_cls(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():  # named_parameters order is deterministic
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.4 + 1.2 * torch.rand(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + normal(p.shape, 0.1))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(normal(p.shape, qk_std))
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.copy_(normal(p.shape, vo_std))
            elif name == "lm_head.weight":
                p.copy_(normal(p.shape, lm_head_std))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(normal(p.shape, lm_head_std if config.tie_word_embeddings else 1.0))
            elif name.endswith("bias"):
                p.copy_(normal(p.shape, 0.02))
            else:
                p.copy_(normal(p.shape, 0.04))
    model.save_pretrained(str(path), safe_serialization=True)
    build_tokenizer(path, config.vocab_size)
    # A plain, explicit rope_theta too: older readers (and our oracle) look for it.
    cfg_path = path / "config.json"
    data = json.loads(cfg_path.read_text())
    data.setdefault("rope_theta", theta)
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return str(path)


# ---- a tiny random GPT-OSS ---------------------------------------------------
# Both layer types (GPT-OSS's default: even layers slide, odd layers are full),
# learned sinks, attention biases, a top-2 MoE with the clamped SwiGLU, YaRN.
TINY_GPTOSS_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=3,  # sliding, full, sliding: a sliding layer reads a full layer's output
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    sliding_window=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    # YaRN as GPT-OSS ships it (factor 32 over 4096 there): 64 * 4 = 256 positions.
    yarn_factor=4.0,
    yarn_original_max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)
GATE_UP_STD = 0.3  # pushes some gate/up values past swiglu_limit 7: the clamp matters
SINK_MEAN, SINK_STD = 1.0, 1.0  # learned sink logits, non-zero, varied per head


def build_tiny_gptoss(path: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """Write a tiny random, unquantized ``GptOssForCausalLM`` folder; returns ``str(path)``.

    Default shape (``TINY_GPTOSS_CONFIG``): 3 layers (sliding 32 / full / sliding 32),
    hidden 128, 4 query / 2 KV heads of 32, 4 experts top-2 (intermediate 128),
    vocab 384 with the tiny Llama's byte-level tokenizer, ``max_position_embeddings``
    256 = YaRN factor 4 x 64 original positions (``truncate`` off, as GPT-OSS ships).
    ``overrides`` replace config entries; special keys ``qk_std``, ``gate_up_std``.
    """
    from transformers import GptOssConfig, GptOssForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    qk_std = overrides.pop("qk_std", QK_STD)
    gate_up_std = overrides.pop("gate_up_std", GATE_UP_STD)
    cfg = {**TINY_GPTOSS_CONFIG, **overrides}
    theta = cfg.pop("rope_theta")
    factor = cfg.pop("yarn_factor")
    original = cfg.pop("yarn_original_max_position_embeddings")
    rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                       "original_max_position_embeddings": original,
                       "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
    # vLLM's GPT-OSS slides exactly the even layers (layer_idx % 2 == 0), whatever
    # the config says: override ``layer_types`` for transformers-only checks.
    layer_types = cfg.pop("layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])]
    config = GptOssConfig(**cfg, rope_parameters=rope_parameters, layer_types=layer_types,
                          dtype="float32", architectures=["GptOssForCausalLM"])
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean

    model = GptOssForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + normal(p.shape, 0.1))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(normal(p.shape, qk_std))
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.copy_(normal(p.shape, VO_STD))
            elif name.endswith("self_attn.sinks"):
                p.copy_(normal(p.shape, SINK_STD, SINK_MEAN))
            elif name == "lm_head.weight":
                p.copy_(normal(p.shape, LM_HEAD_STD))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(normal(p.shape, 1.0))
            elif name.endswith("experts.gate_up_proj"):
                p.copy_(normal(p.shape, gate_up_std))
            elif name.endswith("router.weight"):
                p.copy_(normal(p.shape, 0.3))  # clear top-2 choices
            elif name.endswith(("bias", "_bias")):
                p.copy_(normal(p.shape, 0.02))
            else:
                p.copy_(normal(p.shape, 0.04))
    model.save_pretrained(str(path), safe_serialization=True)
    build_tokenizer(path, config.vocab_size)
    return str(path)


# ---- a tiny random Gemma 3 (text only) ---------------------------------------
# Gemma 3's layer mix at small scale: sliding (own window 32, local RoPE base) /
# global (full attention, its own RoPE base) / sliding, q/k RMSNorm (x * (1 + w)),
# query_pre_attn_scalar != head_dim, sqrt(hidden)-scaled tied embeddings, sandwich
# norms, gelu-tanh MLP, and an active final logit soft-cap.
TINY_GEMMA3_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    sliding_window=32,
    max_position_embeddings=256,
    rope_theta=1_000_000.0,  # global layers (Gemma 3's)
    rope_local_base_freq=10_000.0,  # sliding layers (Gemma 3's)
    query_pre_attn_scalar=48,  # scale 48**-0.5, not head_dim**-0.5: a wrong scale shows
    final_logit_softcapping=8.0,  # Gemma 3 ships none; active here so the oracle's cap is checked
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=UNK_ID,
)


def build_tiny_gemma3(path: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """Write a tiny random text-only ``Gemma3ForCausalLM`` folder; returns ``str(path)``.

    Default shape (``TINY_GEMMA3_CONFIG``): 3 layers (sliding 32 / full / sliding 32),
    hidden 128, 4 query / 2 KV heads of 32, ``max_position_embeddings`` 256, RoPE base
    1e6 on the full layer and 1e4 on the sliding ones, tied embeddings scaled by
    sqrt(128) on input, final logits soft-capped at 8. Norm weights are stored as Gemma
    stores them (the norm multiplies by ``1 + w``); q/k norms give factors 0.4-1.6.
    ``overrides`` replace config entries; special key ``qk_std``.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    qk_std = overrides.pop("qk_std", QK_STD)
    cfg = {**TINY_GEMMA3_CONFIG, **overrides}
    rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")},
                       "sliding_attention": {"rope_type": "default", "rope_theta": cfg.pop("rope_local_base_freq")}}
    cfg["layer_types"] = list(cfg["layer_types"])[: cfg["num_hidden_layers"]]
    config = Gemma3TextConfig(**cfg, rope_parameters=rope_parameters, dtype="float32",
                              architectures=["Gemma3ForCausalLM"])
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    model = Gemma3ForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(-0.6 + 1.2 * torch.rand(p.shape, generator=g))  # factors 1 + w in [0.4, 1.6]
            elif name.endswith("norm.weight"):
                p.copy_(normal(p.shape, 0.1))  # factors 1 + w around 1
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(normal(p.shape, qk_std))
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.copy_(normal(p.shape, VO_STD))
            elif name.endswith("embed_tokens.weight"):
                # tied: the LM head reads it unscaled, the input is scaled by sqrt(128)
                p.copy_(normal(p.shape, LM_HEAD_STD))
            else:
                p.copy_(normal(p.shape, 0.04))
    model.save_pretrained(str(path), safe_serialization=True)
    build_tokenizer(path, config.vocab_size)
    return str(path)


if __name__ == "__main__":  # python tests/tiny_models.py /tmp/tiny-llama
    import sys

    print(build_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-llama"))
