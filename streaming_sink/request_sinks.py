"""Per-request sink lengths (issue 23): the rules every adapter shares, engine-free.

A request may carry its own ``S`` (vLLM: ``vllm_xargs`` / ``SamplingParams.extra_args``
``{"sink_tokens": N}``; SGLang: ``custom_params``). Requests without one get the
server's ``--sink-tokens``. The window, block size and rotary table stay server-wide;
only ``S`` (and with it ``Sb``, the dense regime and ``pos(t)``) is per request, so a
request's contract is ``SinkPolicy.with_sinks(S)``'s.

``--sink-tokens system`` (or ``system:N``): a chat request's ``S`` is the length of its
rendered system turn (:func:`system_turn_tokens`); ``N`` (default 4) for requests without
a system message and for plain completions. A system turn longer than
``--max-sink-tokens`` is capped at it (its first ``--max-sink-tokens`` tokens are
pinned; the adapter logs it): the request is served, never refused for its prompt.

Positions agree => blocks may be shared: a request whose ``S`` differs from the server
default gets ``S`` folded into its prefix-cache identity (:func:`salted`).
"""

from __future__ import annotations

FIELD = "sink_tokens"  # the per-request field (vLLM: vllm_xargs / extra_args; SGLang: custom_params)
SYSTEM = "system"  # `--sink-tokens system[:N]`
DEFAULT_SYSTEM_CAP = 1024  # --max-sink-tokens default in `system` mode
CAP_FLAG = "--max-sink-tokens"


class RequestSinkError(ValueError):
    """A bad per-request sink length; one line naming the field (and the cap flag)."""


def request_sink_tokens(value, default: int, cap: int) -> int:
    """A request's ``S`` from its field value (None: the server's ``default``).
    Integers only (a bool or a float is refused, "8" as a JSON string too), ``0 <= S <= cap``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestSinkError(
            f"{FIELD} must be an integer number of tokens (0 <= {FIELD} <= {cap}, {CAP_FLAG}), "
            f"got {value!r}")
    if value < 0:
        raise RequestSinkError(f"{FIELD} must be >= 0 (0 is plain window attention), got {value}")
    if value > cap:
        raise RequestSinkError(
            f"{FIELD} {value} is above this server's {CAP_FLAG} {cap}; ask for <= {cap} "
            f"or start the server with a larger {CAP_FLAG}")
    return value


def system_turn_tokens(prompt_ids, system_only_ids) -> int:
    """Tokens of the rendered system turn that start the prompt: the common prefix of
    the whole conversation's ids and the ids of the conversation cut to its system
    message (rendered with no generation prompt). Templates render the system turn
    the same way whatever follows it, so the common prefix ends where the system
    turn ends (its end-of-turn marker included); a template that does not (e.g. one
    that folds the system text into the first user turn) yields the shared prefix only."""
    n = 0
    for a, b in zip(prompt_ids, system_only_ids):
        if a != b:
            break
        n += 1
    return n


def capped(sink_tokens: int, cap: int) -> int:
    """A derived ``S`` (a system turn's length) at most the cap."""
    return min(sink_tokens, cap)


def salted(cache_salt: str | None, sink_tokens: int, default: int) -> str | None:
    """The request's prefix-cache salt with ``S`` folded in when ``S`` is not the server
    default: blocks written at other positions must never be shared. Requests at the
    default keep their salt (and so their cache hits with every other such request)."""
    if sink_tokens == default:
        return cache_salt
    tag = f"streaming-sink:S={sink_tokens}"
    return tag if not cache_salt else f"{cache_salt}|{tag}"
