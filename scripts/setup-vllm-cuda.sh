#!/usr/bin/env bash
# Creates .venv-vllm-cuda with the CUDA build of vLLM (the production wheel users install:
# `pip install vllm`), pinned, plus this package and pytest. For the CUDA-build smoke test
# (tests/cuda_build): it needs no GPU -- it checks that every vLLM name the plugin patches
# or subclasses exists in that build with the parameters our code expects, and that the
# flags and refusals work through vLLM's own CLI, up to vLLM's device check.
# Idempotent: a second run only re-installs this package (seconds).
#
# The PyPI vllm 0.33.0 wheel pins torch==2.14.0 (CUDA 13 build) and pulls in ~4 GB of
# nvidia-* libraries even on a CPU machine (~9.4 GB in all). The CUDA torch imports on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_CUDA_VERSION=0.33.0   # keep in CHECKED_VLLM_VERSIONS (streaming_sink/versions.py)
VENV=.venv-vllm-cuda
# Every transitive version pinned (scripts/constraints/*.txt, written by
# scripts/freeze-constraints.sh): next month's CI installs what was tested.
# CONSTRAINTS=none resolves afresh (to move to newer versions, then freeze again).
CONSTRAINTS=${CONSTRAINTS:-scripts/constraints/vllm-cuda.txt}
PIN=(); [ "$CONSTRAINTS" = none ] || PIN=(-c "$CONSTRAINTS")
PIP=("$VENV/bin/pip" install -q --progress-bar off "${PIN[@]}")
step() { echo "== [setup-vllm-cuda] $*"; }
have() { "$VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m, sys
sys.exit(m.version("vllm") != "$VLLM_CUDA_VERSION")
PY
}
if [ ! -x "$VENV/bin/python" ] || ! have; then
  t=$SECONDS
  step "creating $VENV: vllm $VLLM_CUDA_VERSION (CUDA build) + its CUDA torch 2.14 (a few minutes, ~9.4 GB; pip is quiet meanwhile)"
  $PY -m venv "$VENV"
  "${PIP[@]}" --upgrade pip
  "${PIP[@]}" "vllm==$VLLM_CUDA_VERSION"
  step "vllm $VLLM_CUDA_VERSION installed in $((SECONDS - t)) s"
fi
step "installing streaming-sink (editable, --no-deps) + pytest (seconds)"
# --no-deps for our package: its deps (torch, tqdm) are already there, and pip must not
# touch vLLM's torch. Triton comes with vLLM's CUDA wheel (streaming_sink.triton_attention
# imports it). -qq on the editable install: setuptools prints an "Editable installation"
# notice at -q on every run; errors still show.
"$VENV/bin/pip" install -qq --progress-bar off --no-deps -e .
"${PIP[@]}" pytest
# Versions from the metadata only (importing vLLM's CUDA build takes ~10-20 s of CPU here);
# the smoke test itself imports everything.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m, importlib.util
assert importlib.util.find_spec("vllm_sink") and importlib.util.find_spec("vllm")
print("== [setup-vllm-cuda] vLLM", m.version("vllm"), "torch", m.version("torch"), "triton", m.version("triton"),
      "+ streaming-sink", m.version("streaming-sink"), "ready in .venv-vllm-cuda")
PY
