"""Policy off, and policy on below the window: SGLang with this package computes
exactly what stock SGLang does (dense requests run torch_native's own attention).

Stock = a separate process with ``SGLANG_PLUGINS=__none__``, so SGLang loads no
plugin of ours; the same workload runs in this process with the plugin loaded and
``kv_policy`` left at "none". Outputs must be identical, not merely close.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stock_run import workload
from sglang_helpers import engine_args

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def stock(tiny_llama_128, tiny_qwen3_128, tiny_gemma3_128) -> dict:
    """Stock SGLang's outputs per model folder, all from one stock process."""
    env = {**os.environ, "SGLANG_PLUGINS": "__none__"}
    env.pop("SGLANG_SINK_TRACE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env["PYTHONPATH"]])
    out = subprocess.run([sys.executable, str(HERE / "stock_run.py"), tiny_llama_128, tiny_qwen3_128,
                          tiny_gemma3_128],
                         env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "streaming_sink" not in out.stderr  # the stock run really ran without us
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("model_name, kwargs", [
    ("llama", dict(policy=False)),
    # Every request of the workload stays below S + W (window 123: the largest the 128-position
    # rotary table allows), so all rows are dense: torch_native's own SDPA, same numbers.
    ("llama", dict(sink_window=123)),
    ("qwen3", dict(policy=False)),  # q/k RMSNorm: the plugin loaded, policy off, changes nothing
    ("gemma3", dict(policy=False)),  # local/global layers, two RoPE bases: likewise
], ids=["llama, policy off", "llama, policy on, below the window", "qwen3, policy off", "gemma3, policy off"])
def test_outputs_are_stock_sglang(request, stock, model_name, kwargs):
    import sglang

    model = request.getfixturevalue(f"tiny_{model_name}_128")
    engine = sglang.Engine(**engine_args(model, **kwargs))
    try:
        ours = workload(engine)
    finally:
        engine.shutdown()
    want = stock[model]
    assert ours["greedy"] == want["greedy"]
    assert ours["prompt_logprobs"] == want["prompt_logprobs"]
    assert len(ours["greedy"][2]) == 60 and len(ours["prompt_logprobs"]) == 120
