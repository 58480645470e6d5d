#!/usr/bin/env bash
# Creates .venv-sglang with SGLang (its own torch: vLLM pins another, so two venvs),
# this package and its test extras. Idempotent: a second run only re-installs this package.
#
# The PyPI sglang 0.5.23 wheel is the CUDA build: it pins torch==2.14.1 and requires CUDA-only
# packages (flashinfer-python[cu13], nvidia-cutlass-dsl[cu13], cuda-python, sgl-deep-ep, ...),
# so pip installs the CUDA torch and ~3.6 GB of nvidia-* libraries even on a CPU machine
# (~11 GB in all). The CUDA torch runs on CPU. A CPU torch 2.14.1 (+cpu) would satisfy the
# pin, but it lives on download.pytorch.org, not PyPI, and the CUDA-only dependencies stay.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SGLANG_VERSION=0.5.23
# Every transitive version pinned (scripts/constraints/*.txt, written by
# scripts/freeze-constraints.sh): next month's CI installs what was tested.
# CONSTRAINTS=none resolves afresh (to move to newer versions, then freeze again).
CONSTRAINTS=${CONSTRAINTS:-scripts/constraints/sglang.txt}
PIN=(); [ "$CONSTRAINTS" = none ] || PIN=(-c "$CONSTRAINTS")
PIP=(.venv-sglang/bin/pip install -q --progress-bar off "${PIN[@]}")
step() { echo "== [setup-sglang] $*"; }
have() { .venv-sglang/bin/python - <<PY 2>/dev/null
import importlib.metadata as m, sys
sys.exit(m.version("sglang") != "$SGLANG_VERSION")
PY
}
if [ ! -x .venv-sglang/bin/python ] || ! have; then
  t=$SECONDS
  step "creating .venv-sglang: sglang $SGLANG_VERSION + its CUDA torch 2.14.1 (a few minutes, ~11 GB; pip is quiet meanwhile)"
  $PY -m venv .venv-sglang
  "${PIP[@]}" --upgrade pip
  "${PIP[@]}" "sglang==$SGLANG_VERSION"
  step "sglang installed in $((SECONDS - t)) s"
fi
step "installing streaming-sink (editable, --no-deps) + pytest, hypothesis, requests (seconds)"
# --no-deps for our package: its deps (torch, tqdm) are already there, and pip must
# not touch SGLang's torch. Test deps are installed next, again leaving torch alone.
# -qq on the editable install: setuptools prints an "Editable installation" notice at -q
# on every run; errors still show.
.venv-sglang/bin/pip install -qq --progress-bar off --no-deps -e .
"${PIP[@]}" pytest hypothesis requests
.venv-sglang/bin/python -c "import sglang, torch; print('== [setup-sglang] SGLang', sglang.__version__, 'torch', torch.__version__, 'ready in .venv-sglang')"
