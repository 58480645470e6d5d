"""Tiny random hybrid models (softmax-attention layers + state layers), for the refusal tests.

``build_tiny_hybrid(path, kind)`` writes an HF folder (float32 weights, the tiny byte-level
tokenizer of tiny_models.py). ``kind``:

- ``"qwen3_next"``: ``Qwen3NextForCausalLM``, layers [linear_attention (Gated DeltaNet, head 128:
  vLLM's CPU kernel takes no 32),
  full_attention (gated softmax attention, partial RoPE)], a 4-expert MoE with a shared expert.
- ``"jamba"``: ``JambaForCausalLM``, layers [mamba, attention (no RoPE)], a 2-expert MoE on
  the attention layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tiny_models import BOS_ID, EOS_ID, VOCAB_SIZE, build_tokenizer

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=BOS_ID,
               eos_token_id=EOS_ID, pad_token_id=0)

HYBRIDS = {
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        head_dim=32, layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
        full_attention_interval=2,  # SGLang's Qwen3NextConfig reads it (HF checkpoints carry it)
        linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, decoder_sparse_step=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=8, use_mamba_kernels=False)),
}


def build_tiny_hybrid(path: str | os.PathLike, kind: str, seed: int = 0, **overrides) -> str:
    import transformers

    config_name, model_name, extra = HYBRIDS[kind]
    config = getattr(transformers, config_name)(**{**_COMMON, **extra, **overrides}, dtype="float32",
                                                architectures=[model_name])
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    build_tokenizer(path, config.vocab_size)
    return str(path)
