"""Shared fixtures. Env first: every engine in this session runs offline and quiet."""

import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of the tiny random Llama folder (tests/tiny_models.py), built once."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """A tiny random Qwen3 (q/k RMSNorm before RoPE), built once."""
    from tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


# Modules whose engines leave the process unable to build another vLLM engine run last:
# n-gram speculative decoding imports numba, and vLLM 0.32's Triton-override scan of
# sys.modules (at every engine's worker init) then trips on llvmlite's library proxy.
RUN_LAST = ("test_vllm_spec_decode.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name in RUN_LAST)  # stable: the rest keep their order
