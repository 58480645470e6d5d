#!/usr/bin/env bash
# The main job on a fresh machine: set up vLLM + streaming-sink, prepare the
# embedded SmolLM2 and the Austen text (offline, cached), then serve with
# --kv-policy streaming-sink and stream a completion past the 8192-token context.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-vllm.sh
.venv/bin/streaming-sink-prepare all
exec .venv/bin/python examples/stream_past_context.py "$@"
