"""Bad settings are refused at startup, in the main process, naming the flag:
through ``sglang.Engine(...)`` keywords and through the stock launcher's argv.
The explicit-flag rule: a flag the user set is honoured, or refused naming it; only a
default is changed, with a log line."""

from __future__ import annotations

import logging
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
    # stock SGLang on CPU cannot run it (NGRAM's worker imports sgl_kernel.speculative)
    (dict(speculative_algorithm="NGRAM"), "--speculative-algorithm"),
    (dict(chunked_prefill_size=-1), "--chunked-prefill-size"),
    (dict(page_size=16), "--page-size"),
    # The radix cache is ours with the policy: another tree backend is refused, not overridden.
    (dict(radix_cache_backend="foo"), "--radix-cache-backend"),
    (dict(enable_lmcache=True), "--enable-lmcache"),
    # Our attention backend subclasses torch_native: any other explicit backend is refused.
    (dict(attention_backend="triton"), "--attention-backend triton"),
    (dict(attention_backend="intel_amx"), "--attention-backend intel_amx"),
    (dict(prefill_attention_backend="fa3"), "--prefill-attention-backend fa3"),
    (dict(decode_attention_backend="flashinfer"), "--decode-attention-backend flashinfer"),
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


FLAGS = dict(kv_policy="streaming-sink", sink_tokens=S, sink_window=W)


def _apply(model: str, caplog, **kwargs):
    """``apply_flags`` on a real, unresolved ServerArgs (what the launcher and Engine hand
    it): the settings after it, and its one "defaults changed" log line."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    from sglang_sink.flags import apply_flags

    load_plugins()  # the hooks, applied as in every SGLang process (startup checks them)
    sa = ServerArgs(model_path=model, device="cpu", **kwargs)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sglang.streaming_sink"):
        apply_flags(sa, FLAGS)
    lines = [r.getMessage() for r in caplog.records if "defaults changed" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    return sa, lines[0]


def test_explicit_flags_are_honoured(tiny_llama_128, caplog):
    sa, line = _apply(tiny_llama_128, caplog, attention_backend="torch_native", context_length=4096,
                      max_running_requests=3, page_size=1, disable_overlap_schedule=True)
    assert (sa.attention_backend, sa.context_length, sa.max_running_requests, sa.page_size) == \
        ("torch_native", 4096, 3, 1)
    changed = line.split("defaults changed:")[1].split("; attention:")[0]
    for flag in ("--context-length", "--max-running-requests", "--page-size", "--disable-overlap-schedule"):
        assert flag not in changed, line  # given: not a default, so not changed
    assert "--attention-backend torch_native as given" in line


def test_changed_defaults_are_logged(tiny_llama_128, caplog):
    from sglang_sink import config

    sa, line = _apply(tiny_llama_128, caplog)
    assert sa.context_length == config.DEFAULT_STREAM_LEN
    assert sa.max_running_requests == config.DEFAULT_MAX_RUNNING_REQUESTS
    assert sa.attention_backend is None  # SGLang resolves its default later; ours replaces it
    assert (sa.page_size, sa.disable_overlap_schedule, sa.disable_hybrid_swa_memory) == (1, True, True)
    for change in (f"--context-length {config.DEFAULT_STREAM_LEN}",
                   f"--max-running-requests {config.DEFAULT_MAX_RUNNING_REQUESTS}",
                   "--radix-cache-backend streaming-sink", "--page-size 1", "--disable-overlap-schedule",
                   "--disable-hybrid-swa-memory", "replaces SGLang's default"):
        assert change in line, line


def test_model_forced_backend_accepted(tmp_path, caplog):
    """GPT-OSS: SGLang 0.5.23 demands a backend from its list (where its own default is not
    on it, e.g. an arm64 CPU, the user must name one): accepted, logged, ours runs."""
    from tiny_models import build_tiny_gptoss

    model = build_tiny_gptoss(tmp_path / "gptoss", max_position_embeddings=128)
    sa, line = _apply(model, caplog, attention_backend="triton")
    assert sa.attention_backend == "triton" and "--attention-backend triton as given" in line
    with pytest.raises(PolicyConfigError, match="--attention-backend flashinfer"):
        _apply(model, caplog, attention_backend="flashinfer")  # not on the model's list


def test_launcher_refuses_an_explicit_backend(tiny_llama_128):
    out = _launch(["--model-path", tiny_llama_128, "--device", "cpu", "--port", "1",
                   "--kv-policy", "streaming-sink", "--attention-backend", "triton"])
    assert out.returncode != 0
    assert "PolicyConfigError" in out.stderr and "--attention-backend triton" in out.stderr, out.stderr[-2000:]
