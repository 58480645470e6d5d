"""The vLLM version the hooks were checked against (the table: streaming_sink/versions.py)."""

from __future__ import annotations

from streaming_sink import versions

CHECKED_VLLM_VERSIONS = versions.CHECKED_VERSIONS["vllm"]


def vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def check_version() -> None:
    versions.check_version("vllm", vllm_version())
