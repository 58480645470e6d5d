#!/usr/bin/env bash
# Writes scripts/constraints/{vllm,sglang,vllm-cuda}.txt from the three venvs the setup
# scripts built (.venv, .venv-sglang, .venv-vllm-cuda): every installed distribution at
# its exact version, minus this package (editable) and the metadata-only `vllm` shim of
# setup-vllm.sh (a local wheel). The setup scripts install with `-c` these files, so a
# fresh CI machine gets the same transitive versions as the machine that froze them.
# To move to newer versions: delete a venv, run its setup script without the file
# (CONSTRAINTS=none), check the tests, then run this again.
set -euo pipefail
cd "$(dirname "$0")/.."
freeze() {  # venv name
  local venv=$1 out=scripts/constraints/$2.txt
  [ -x "$venv/bin/pip" ] || { echo "no $venv: run its setup script first" >&2; return 1; }
  {
    echo "# pip freeze of $venv ($("$venv/bin/python" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])'), $(date -u +%Y-%m-%d)),"
    echo "# written by scripts/freeze-constraints.sh; used by scripts/setup-$2.sh as pip -c."
    "$venv/bin/pip" freeze --exclude-editable 2>/dev/null \
      | grep -v -e '^#' -e '^-e ' -e '^vllm @ file:' -e '^streaming-sink==' -e '^streaming_sink=='
  } > "$out"
  echo "$out: $(grep -vc '^#' "$out") pins"
}
freeze .venv vllm
freeze .venv-sglang sglang
freeze .venv-vllm-cuda vllm-cuda
