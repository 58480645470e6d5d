#!/usr/bin/env bash
# The main job on a fresh machine: set up vLLM + streaming-sink, prepare the embedded
# SmolLM2-135M-Instruct and the Austen text (offline, cached), then `vllm serve` it with
# --kv-policy streaming-sink and stream one request 4x past its 8192-token context,
# with a live line of KV use and a PNG plot at the end.
#
#   bash examples/demo.sh                      # the embedded SmolLM2
#   bash examples/demo.sh --model PATH         # your own Hugging Face model folder
#   bash examples/demo.sh --help               # every option of examples/stream_past_context.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-vllm.sh
assets=all
for arg in "$@"; do
  case $arg in --model|--model=*) assets=corpus ;; esac  # your own model: only the text is needed
done
echo "== [demo] preparing the offline assets: $assets (cached; ~30 s the first time)"
.venv/bin/streaming-sink-prepare "$assets" > /dev/null
echo "== [demo] streaming (first server start compiles the model: 1-3 min; cached afterwards)"
exec .venv/bin/python examples/stream_past_context.py "$@"
