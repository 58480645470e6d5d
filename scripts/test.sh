#!/usr/bin/env bash
# Sets up both engines (separate venvs: vLLM and SGLang pin different torch versions)
# and runs the tests: everything but tests/sglang in .venv (vLLM), tests/sglang in
# .venv-sglang (SGLang). Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-vllm.sh
bash scripts/setup-sglang.sh
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/sglang "$@" || status=$?
.venv-sglang/bin/python -m pytest -q -p no:cacheprovider tests/sglang "$@" || status=$?
exit $status
