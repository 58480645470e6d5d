#!/usr/bin/env bash
# Sets up everything (vLLM venv, this package, test deps) and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-vllm.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
