#!/usr/bin/env bash
# Creates .venv-sglang with SGLang (its own torch: vLLM pins another, so two venvs),
# this package and its test extras. Idempotent: a second run only re-installs this package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SGLANG_VERSION=0.5.23
have() { .venv-sglang/bin/python - <<PY 2>/dev/null
import importlib.metadata as m, sys
sys.exit(m.version("sglang") != "$SGLANG_VERSION")
PY
}
if [ ! -x .venv-sglang/bin/python ] || ! have; then
  echo "== creating .venv-sglang with sglang $SGLANG_VERSION (a few minutes, ~11 GB)"
  $PY -m venv .venv-sglang
  .venv-sglang/bin/pip install -q --upgrade pip
  .venv-sglang/bin/pip install -q "sglang==$SGLANG_VERSION"
fi
# --no-deps for our package: its deps (torch, tqdm) are already there, and pip must
# not touch SGLang's torch. Test deps are installed next, again leaving torch alone.
.venv-sglang/bin/pip install -q --no-deps -e .
.venv-sglang/bin/pip install -q pytest hypothesis requests
.venv-sglang/bin/python -c "import sglang, torch; print('SGLang', sglang.__version__, 'torch', torch.__version__, 'ready')"
