"""``--kv-cache-dtype`` with the policy on SGLang 0.5.23 (CPU).

Stock SGLang on CPU runs no fp8 pool the policy could read: fp8_e4m3 only with Intel AMX
and its intel_amx attention backend (the policy's backend is a torch_native subclass),
fp8_e5m2 not at all. So both are refused in one line naming the flag. A plain bf16 pool
is what it says: served, here under an fp32 model, against the oracle fed bf16 K/V.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kv_rounding import CachedKVOracle, round_bf16
from sglang_helpers import S, W, engine_args, prompt_logprobs, random_ids

from streaming_sink.policy import PolicyConfigError

HERE = Path(__file__).parent
CONTEXT = 128


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_refused_in_one_line_naming_the_flag(tiny_llama_128, kv_dtype):
    import sglang

    with pytest.raises(PolicyConfigError) as err:
        sglang.Engine(**engine_args(tiny_llama_128, kv_cache_dtype=kv_dtype))
    message = str(err.value)
    assert "\n" not in message
    assert f"--kv-cache-dtype {kv_dtype} (SGLang runs an fp8 KV cache on CPU only with Intel AMX" in message


def test_stock_sglang_on_cpu_cannot_run_fp8_with_torch_native(tiny_llama_128):
    """Why the refusal: stock SGLang (no plugin) with the policy's base backend refuses an
    fp8 pool on CPU itself (without AMX: it needs AMX; with AMX: it needs intel_amx)."""
    env = {**os.environ, "SGLANG_PLUGINS": "__none__"}
    env.pop("SGLANG_SINK_TRACE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env["PYTHONPATH"]])
    out = subprocess.run([sys.executable, str(HERE / "stock_run.py"), tiny_llama_128,
                          'kv_cache_dtype="fp8_e4m3"', 'attention_backend="torch_native"'],
                         env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert out.returncode != 0
    assert ("CPU FP8 KV cache requires Intel AMX support" in out.stderr
            or "CPU FP8 KV cache requires the intel_amx attention backend" in out.stderr), out.stderr[-2000:]
    from sglang.srt.mem_cache.kv_cache_dtype import configure_kv_cache_dtype

    with pytest.raises(ValueError, match="fp8_e5m2 is not supported on CPU"):
        configure_kv_cache_dtype(server_args_kv_cache_dtype="fp8_e5m2", model=None, model_dtype=None,
                                 is_draft_worker=False, is_dflash=False,
                                 speculative_draft_attention_backend=None)


def test_bf16_pool_served_past_the_window(tiny_llama_128):
    """``--kv-cache-dtype bfloat16`` under an fp32 model: a bf16 token pool (SGLang's write
    rounds to nearest, torch's cast), attended by the policy 8x past the context, against
    the oracle that rounds its own K/V alike. The engine's fp32 values differ from the
    oracle's float64 ones by ~1e-6 relative, far below a bf16 step (2^-8): both round alike
    except an element within that error of a rounding boundary, which then differs by one
    bf16 step, and the rows that attend it (and later layers) by up to a few 1e-3 (measured
    max 3.9e-3 over 1024 rows). So: the typical row at the fp32 engine tolerance (median
    < 2e-4), none past 1e-2, and an oracle that ignores the rounding typically farther off.
    (vLLM's test reads the cache back instead: exact per row; SGLang's pool lives in its
    scheduler process.)"""
    import sglang

    from oracle import OracleLlama

    engine = sglang.Engine(**engine_args(tiny_llama_128, kv_cache_dtype="bfloat16"))
    try:
        ids = random_ids(8 * CONTEXT, seed=5)
        got = prompt_logprobs(engine, ids)
    finally:
        engine.shutdown()
    want = CachedKVOracle(tiny_llama_128, round_bf16, sink_tokens=S, window_tokens=W, block_size=1)
    diff = (got - want.token_logprobs(ids)).abs()
    assert diff.median().item() < 2e-4, f"median |engine - oracle| {diff.median():.3g}"
    assert diff.max().item() < 1e-2, f"max |engine - oracle| {diff.max():.3g} at token {diff.argmax() + 1}"
    plain = OracleLlama(tiny_llama_128, sink_tokens=S, window_tokens=W, block_size=1)
    off = (got - plain.token_logprobs(ids)).abs()
    assert off.median().item() > 3 * diff.median().item(), (off.median(), diff.median())
