"""SGLang tests: real SGLang 0.5.23 on CPU, run in .venv-sglang (scripts/test.sh).

Env first, before anything imports sglang: the CPU engine, offline, one OpenMP
thread per process (these machines have 2 shared cores; tiny per-token ops
under contended OpenMP run ~50x slower), and the CPU stand-in for the CUDA-only
``sgl_kernel`` first on the path, for this process, the Engine's spawned
scheduler (it inherits sys.path) and server subprocesses (PYTHONPATH).
In a venv without SGLang (the vLLM one) this folder collects nothing and
changes nothing.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Not a bare find_spec: with tests/ on sys.path, this very folder is a namespace
# package named "sglang" (the real, regular package wins wherever it is installed).
_spec = importlib.util.find_spec("sglang")
HAVE_SGLANG = _spec is not None and _spec.origin is not None
CPU_SUPPORT = str(Path(__file__).parent / "cpu_support")
CONTEXT = 128  # the tiny models' max_position_embeddings here

if HAVE_SGLANG:
    sys.path.insert(0, CPU_SUPPORT)
    sys.path.insert(0, str(Path(__file__).parent))  # sglang_helpers, stock_run
    for _k, _v in {
        "SGLANG_USE_CPU_ENGINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }.items():
        os.environ.setdefault(_k, _v)
    os.environ["PYTHONPATH"] = os.pathsep.join([CPU_SUPPORT, *filter(None, [os.environ.get("PYTHONPATH")])])


def pytest_ignore_collect(collection_path, config):
    return not HAVE_SGLANG


@pytest.fixture(scope="session")
def tiny_llama_128(tmp_path_factory) -> str:
    """The tiny random Llama of tests/tiny_models.py with a 128-position context."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-128"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="session")
def tiny_qwen3_128(tmp_path_factory) -> str:
    """The tiny random Qwen3 (q/k RMSNorm before RoPE) with a 128-position context."""
    from tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-128"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="session")
def tiny_gemma3_128(tmp_path_factory) -> str:
    """The tiny random Gemma 3 (local + global layers, two RoPE bases) with a 128-position context."""
    from tiny_models import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3-128"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="session")
def tiny_gptoss_128(tmp_path_factory) -> str:
    """The tiny random GPT-OSS (learned sinks, sliding + full layers, YaRN factor 4 over 32
    original positions, MoE) with a 128-position context. SGLang keeps the sink logits in
    bfloat16, so they are written bfloat16-exact: a comparison is then of the attention."""
    import torch
    from safetensors.torch import load_file, save_file

    from tiny_models import build_tiny_gptoss

    path = build_tiny_gptoss(tmp_path_factory.mktemp("tiny-gptoss-128"), max_position_embeddings=CONTEXT,
                             yarn_original_max_position_embeddings=CONTEXT // 4)
    f = f"{path}/model.safetensors"
    weights = load_file(f)
    for name in [n for n in weights if n.endswith("self_attn.sinks")]:
        weights[name] = weights[name].to(torch.bfloat16).float()
    save_file(weights, f, metadata={"format": "pt"})
    return path
