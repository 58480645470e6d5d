#!/usr/bin/env bash
# Sets up both engines (separate venvs: vLLM and SGLang pin different torch versions)
# and runs the tests: everything but tests/sglang and tests/cuda_build in .venv (vLLM),
# tests/sglang in .venv-sglang (SGLang), and tests/cuda_build -- the smoke test of vLLM's
# CUDA wheel, no GPU needed -- in .venv-vllm-cuda. Extra arguments go to all three pytest runs.
#
# Progress: pytest -v prints each test's name when it starts and PASSED/FAILED when it
# ends (some end-to-end tests run real servers for minutes); -rfEs lists failures, errors
# and skips at the end, --durations the slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# Disk: the three venvs take ~25 GB once installed (vLLM CPU ~4, SGLang ~11, vLLM CUDA ~9.5;
# pip needs more while it unpacks). Say up front what a fresh setup needs, and stop with one
# line when the disk cannot hold even the installed venvs (pip would fail minutes in with
# "No space left on device").
need_gb=0
[ -x .venv/bin/python ] || need_gb=$((need_gb + 4))
[ -x .venv-sglang/bin/python ] || need_gb=$((need_gb + 11))
[ -x .venv-vllm-cuda/bin/python ] || need_gb=$((need_gb + 9))
free_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
echo "== [test] disk: ${free_gb} GB free here; the venvs still to install need ~${need_gb} GB"
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "== [test] error: ${free_gb} GB free, the missing venvs need ~${need_gb} GB: free disk space first" >&2
  exit 1
fi
bash scripts/setup-vllm.sh
bash scripts/setup-sglang.sh
bash scripts/setup-vllm-cuda.sh
PYTEST=(-p no:cacheprovider -v -rfEs --durations=8)
status=0 vllm_rc=0 sglang_rc=0 cuda_rc=0

t=$SECONDS
echo "== [test] vLLM tests in .venv: tests/ except tests/sglang and tests/cuda_build"
.venv/bin/python -m pytest "${PYTEST[@]}" tests --ignore=tests/sglang --ignore=tests/cuda_build "$@" || vllm_rc=$?
echo "== [test] vLLM tests: exit $vllm_rc after $(( (SECONDS - t) / 60 )) min $(( (SECONDS - t) % 60 )) s"

t=$SECONDS
echo "== [test] SGLang tests in .venv-sglang: tests/sglang"
.venv-sglang/bin/python -m pytest "${PYTEST[@]}" tests/sglang "$@" || sglang_rc=$?
echo "== [test] SGLang tests: exit $sglang_rc after $(( (SECONDS - t) / 60 )) min $(( (SECONDS - t) % 60 )) s"

t=$SECONDS
echo "== [test] vLLM CUDA-build smoke test in .venv-vllm-cuda: tests/cuda_build (no GPU needed)"
.venv-vllm-cuda/bin/python -m pytest "${PYTEST[@]}" tests/cuda_build "$@" || cuda_rc=$?
echo "== [test] vLLM CUDA-build smoke test: exit $cuda_rc after $(( (SECONDS - t) / 60 )) min $(( (SECONDS - t) % 60 )) s"

verdict() { case $1 in 0) echo passed ;; 5) echo "no tests selected" ;; *) echo FAILED ;; esac; }
# pytest's 5 = no tests collected: with arguments (a -k that matches tests of one venv only)
# not a failure; without, it is one.
for rc in $vllm_rc $sglang_rc $cuda_rc; do
  case $rc in 0) ;; 5) [ $# -gt 0 ] || status=1 ;; *) status=1 ;; esac
done
echo "== [test] done in $(( (SECONDS - start) / 60 )) min: vLLM $(verdict $vllm_rc), SGLang $(verdict $sglang_rc), vLLM CUDA build $(verdict $cuda_rc)"
exit $status
