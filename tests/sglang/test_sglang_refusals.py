"""Bad settings are refused at startup, in the main process, naming the flag:
through ``sglang.Engine(...)`` keywords and through the stock launcher's argv."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sglang_helpers import S, W, engine_args

from streaming_sink.policy import PolicyConfigError

LAUNCHER = [sys.executable, "-m", "sglang.launch_server"]


@pytest.mark.parametrize("kwargs, flag", [
    (dict(sink_tokens=-1), "--sink-tokens"),
    (dict(sink_window=0), "--sink-window"),
    (dict(sink_window=128), "--sink-window"),  # 4 + 128 + 1 positions > the 128-position rotary table
    (dict(kv_policy="evict-everything"), "--kv-policy"),
    (dict(kv_policy="none", sink_window=W), "--kv-policy"),  # window without the policy
    (dict(kv_cache_dtype="fp8_e4m3"), "--kv-cache-dtype"),
    (dict(chunked_prefill_size=-1), "--chunked-prefill-size"),
    (dict(page_size=16), "--page-size"),
    # The radix cache is ours with the policy: another tree backend is refused, not overridden.
    (dict(radix_cache_backend="foo"), "--radix-cache-backend"),
    (dict(enable_lmcache=True), "--enable-lmcache"),
])
def test_bad_config_refused_at_startup(tiny_llama_128, kwargs, flag):
    import sglang

    with pytest.raises(PolicyConfigError, match=flag):
        sglang.Engine(**engine_args(tiny_llama_128, **kwargs))


def test_model_without_rope_refused(tmp_path, tiny_llama_128):
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel

    import sglang

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=128, vocab_size=384)).save_pretrained(path)
    for f in Path(tiny_llama_128).iterdir():  # borrow the tokenizer
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(PolicyConfigError, match="RoPE"):
        sglang.Engine(**engine_args(str(path)))


def _launch(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCHER + args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ), start_new_session=True)


def test_launcher_help_lists_the_flags():
    out = _launch(["--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--kv-policy {none,streaming-sink}", "--sink-tokens", "--sink-window"):
        assert flag in out.stdout


def test_launcher_refuses_before_loading_the_model(tiny_llama_128):
    out = _launch(["--model-path", tiny_llama_128, "--device", "cpu", "--port", "1",
                   "--kv-policy", "streaming-sink", "--sink-tokens", str(S), "--sink-window", "4096"])
    assert out.returncode != 0
    assert "PolicyConfigError" in out.stderr and "--sink-window <= 123" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("kind, arch", [("qwen3_next", "Qwen3NextForCausalLM"), ("jamba", "JambaForCausalLM")])
def test_hybrid_model_refused(tmp_path, kind, arch):
    """Linear-attention / SSM hybrids: refused before SGLang starts (docs/models.md). Without
    the policy, SGLang 0.5.23 on CPU cannot run either: Qwen3-Next's Gated DeltaNet layer asks
    torch.cuda for its device, Jamba has no SGLang implementation."""
    import sglang

    from tiny_hybrids import build_tiny_hybrid

    path = build_tiny_hybrid(tmp_path / kind, kind)
    with pytest.raises(PolicyConfigError, match=rf"\({kind}, {arch}\) has .*linear_attention"):
        sglang.Engine(**engine_args(path))
