"""What a test needs from outside the repository (the offline model and corpus, an
optional package): available, or the test cannot run. A developer's local run then
skips it, saying why; CI (``CI`` set to true, as CI runners and .ci/run do) fails it,
so a green CI run never hides real-model evidence behind a skip.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import NoReturn, TypeVar

import pytest

T = TypeVar("T")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(why: str) -> NoReturn:
    """Skip locally, fail in CI; either way the message says what is missing."""
    if in_ci():
        pytest.fail(f"{why} [CI: a missing asset fails; unset CI to skip locally]", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def require_modules(*names: str, hint: str) -> None:
    """The packages a test imports (``hint``: how to install them)."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        unavailable(f"needs {', '.join(missing)} ({hint})")


def require_asset(what: str, build: Callable[[], T]) -> T:
    """``build()``'s result (e.g. a prepared model path); when it cannot be prepared
    here (streaming_sink_tools.prepare.AssetError, a missing package, no file), the
    test is unavailable, named by ``what`` and the reason."""
    from streaming_sink_tools.prepare import AssetError

    try:
        return build()
    except (AssetError, ImportError, OSError) as err:
        unavailable(f"{what} unavailable: {type(err).__name__}: {err}")
