#!/usr/bin/env bash
# Sets up both engines (separate venvs: vLLM and SGLang pin different torch versions)
# and runs the tests: everything but tests/sglang in .venv (vLLM), tests/sglang in
# .venv-sglang (SGLang). Extra arguments go to both pytest runs.
#
# Progress: pytest -v prints each test's name when it starts and PASSED/FAILED when it
# ends (some end-to-end tests run real servers for minutes); -rfEs lists failures, errors
# and skips at the end, --durations the slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup-vllm.sh
bash scripts/setup-sglang.sh
PYTEST=(-p no:cacheprovider -v -rfEs --durations=8)
status=0 vllm_rc=0 sglang_rc=0

t=$SECONDS
echo "== [test] vLLM tests in .venv: tests/ except tests/sglang"
.venv/bin/python -m pytest "${PYTEST[@]}" tests --ignore=tests/sglang "$@" || vllm_rc=$?
echo "== [test] vLLM tests: exit $vllm_rc after $(( (SECONDS - t) / 60 )) min $(( (SECONDS - t) % 60 )) s"

t=$SECONDS
echo "== [test] SGLang tests in .venv-sglang: tests/sglang"
.venv-sglang/bin/python -m pytest "${PYTEST[@]}" tests/sglang "$@" || sglang_rc=$?
echo "== [test] SGLang tests: exit $sglang_rc after $(( (SECONDS - t) / 60 )) min $(( (SECONDS - t) % 60 )) s"

verdict() { case $1 in 0) echo passed ;; 5) echo "no tests selected" ;; *) echo FAILED ;; esac; }
# pytest's 5 = no tests collected: with arguments (a -k that matches tests of one venv only)
# not a failure; without, it is one.
for rc in $vllm_rc $sglang_rc; do
  case $rc in 0) ;; 5) [ $# -gt 0 ] || status=1 ;; *) status=1 ;; esac
done
echo "== [test] done in $(( (SECONDS - start) / 60 )) min: vLLM $(verdict $vllm_rc), SGLang $(verdict $sglang_rc)"
exit $status
