"""The flags, for every engine: names, defaults, help text, validation, and how
the checked values become a :class:`~streaming_sink.policy.SinkPolicy` again in each
engine process.

An adapter adds them to its engine's own parser (``add_flags``), checks them with
``check_flags`` (same rules and messages everywhere), resolves the window once the
model and block size are known (``SinkPolicy.resolve``) and ships the result as a
plain dict (``resolved_settings``) that each process turns back into the same policy
(``policy_from_settings``). Engine-free: no engine import.
"""

from __future__ import annotations

from typing import Any

from .errors import PolicyConfigError
from .request_sinks import DEFAULT_SYSTEM_CAP, SYSTEM

NUMBER = "number"  # --sink-tokens N (SYSTEM: --sink-tokens system[:N])

FLAGS = ("kv_policy", "sink_tokens", "sink_window", "max_sink_tokens")  # argparse dests and engine keywords
KV_POLICIES = ("none", "streaming-sink")
DEFAULT_SINK_TOKENS = 4
# How far a request may stream when the user gives no length (vLLM --max-model-len,
# SGLang --context-length). Both engines keep a [max requests, length] token table on
# the host, so this is a memory choice, not a limit of the policy.
DEFAULT_STREAM_LEN = 131072

# What one KV unit is called in each engine's help text (vLLM: paged blocks of
# --block-size tokens; SGLang: token slots, page size 1) and where its docs live.
_ENGINE_HELP = {
    "vllm": ("blocks", "docs/architecture.md", ", a multiple of --block-size"),
    "sglang": ("slots", "docs/sglang.md", ""),
}


def add_flags(parser, engine: str, changed_defaults: str = "") -> None:
    """``--kv-policy --sink-tokens --sink-window`` as one argument group of ``parser``
    (an argparse parser or group container; ``engine``: "vllm" or "sglang").
    ``changed_defaults``: the engine defaults the policy changes, in the adapter's words,
    shown in the group's description (``--help=streaming-sink``)."""
    unit, doc, window_rule = _ENGINE_HELP[engine]
    group = parser.add_argument_group(
        "streaming-sink", "StreamingLLM attention sinks: stream past the context window "
        f"with bounded KV memory ({doc})." + (f" {changed_defaults}" if changed_defaults else ""))
    group.add_argument("--kv-policy", choices=list(KV_POLICIES), default="none",
                       help="KV cache policy. 'streaming-sink' pins the first --sink-tokens "
                            f"tokens and keeps a sliding window of recent KV {unit}.")
    # Engines' help formatters append "(default: None)"; the help says what None means.
    group.add_argument("--sink-tokens", type=_sink_tokens_arg, default=None,
                       help=f"Tokens kept forever as attention sinks; None means {DEFAULT_SINK_TOKENS} "
                            "(0: plain window attention, the baseline that collapses). 'system' or "
                            "'system:N': each chat request's sinks are its rendered system turn (N, "
                            f"default {DEFAULT_SINK_TOKENS}, for requests without one). A request may "
                            "ask for its own with the request field sink_tokens.")
    group.add_argument("--max-sink-tokens", type=int, default=None,
                       help="Largest sink_tokens a request may ask for (above: refused with a 400); "
                            "None means the numeric --sink-tokens (so a request may only ask for "
                            f"less), or {DEFAULT_SYSTEM_CAP} with --sink-tokens system (a longer "
                            "system turn is pinned up to it).")
    group.add_argument("--sink-window", type=int, default=None,
                       help=f"Recent tokens kept{window_rule}; None means the largest window the "
                            "model's rotary table allows.")


def check_flags(kv_policy: str | None, sink_tokens: int | str | None, sink_window: int | None,
                max_sink_tokens: int | None = None, sink_mode: str | None = None) -> dict | None:
    """The user's flags, checked for what needs no model (the rest waits for it);
    the same rules and messages for every engine. None when the policy is off.
    ``sink_tokens``: a number, or ``"system"`` / ``"system:N"`` (settings:
    ``sink_tokens`` = N, ``sink_mode`` = "system"). Idempotent on its own output (pass its
    ``sink_mode`` back)."""
    kv_policy = kv_policy or "none"
    if kv_policy not in KV_POLICIES:
        raise PolicyConfigError(f"--kv-policy must be one of {', '.join(KV_POLICIES)}, got {kv_policy!r}")
    if kv_policy == "none":
        if sink_tokens is not None or sink_window is not None or max_sink_tokens is not None:
            raise PolicyConfigError(
                "--sink-tokens / --sink-window / --max-sink-tokens need --kv-policy streaming-sink")
        return None
    mode, sink_tokens = parse_sink_tokens(sink_tokens)
    if sink_mode == SYSTEM:
        mode = SYSTEM
    if sink_window is not None and int(sink_window) <= 0:
        raise PolicyConfigError(f"--sink-window must be a positive number of tokens, got {sink_window}")
    if max_sink_tokens is None:
        max_sink_tokens = DEFAULT_SYSTEM_CAP if mode == SYSTEM else sink_tokens
    elif isinstance(max_sink_tokens, bool) or int(max_sink_tokens) != max_sink_tokens or max_sink_tokens < 0:
        raise PolicyConfigError(f"--max-sink-tokens must be a number of tokens >= 0, got {max_sink_tokens!r}")
    max_sink_tokens = int(max_sink_tokens)
    if max_sink_tokens < sink_tokens:
        raise PolicyConfigError(
            f"--max-sink-tokens {max_sink_tokens} is below --sink-tokens {sink_tokens} (the server "
            f"default must be a length a request may have): raise it or leave it unset")
    return {"kv_policy": kv_policy, "sink_tokens": sink_tokens,
            "sink_window": None if sink_window is None else int(sink_window),
            "max_sink_tokens": max_sink_tokens, "sink_mode": mode}


def parse_sink_tokens(value) -> tuple[str, int]:
    """``--sink-tokens`` as (mode, number): ``("number", N)`` or ``("system", fallback N)``."""
    if value is None:
        return NUMBER, DEFAULT_SINK_TOKENS
    text = str(value).strip()
    mode, number = NUMBER, text
    if text == SYSTEM or text.startswith(SYSTEM + ":"):
        mode, number = SYSTEM, text[len(SYSTEM) + 1:] or str(DEFAULT_SINK_TOKENS)
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        n = int(number)
    except ValueError:
        raise PolicyConfigError(
            f"--sink-tokens must be a number of tokens, '{SYSTEM}' or '{SYSTEM}:N', got {value!r}") from None
    if n < 0:
        raise PolicyConfigError(f"--sink-tokens must be >= 0 (0 is plain window attention), got {n}")
    return mode, n


def _sink_tokens_arg(text: str):
    """argparse type of --sink-tokens: an int, or the text of the system mode."""
    import argparse

    try:
        mode, n = parse_sink_tokens(text)
    except PolicyConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return n if mode == NUMBER else text.strip()


def max_sink_tokens(opts: dict) -> int:
    """The per-request cap of a settings dict (settings from before the cap: the default S)."""
    return int(opts.get("max_sink_tokens", opts["sink_tokens"]))


def system_mode(opts: dict | None) -> bool:
    """Whether the settings put each chat request's system turn in its sinks."""
    return bool(opts) and opts.get("sink_mode") == SYSTEM


def larger_request_sinks(opts: dict | None) -> bool:
    """Whether the settings let a request carry an S above the default (system mode, or a cap
    above --sink-tokens): what an operator turns on to get per-request sinks. A smaller S is
    allowed under any settings."""
    return system_mode(opts) or (bool(opts) and max_sink_tokens(opts) > opts["sink_tokens"])


def flags_given(flags: dict) -> bool:
    """Whether the user touched any of the flags (all unset: nothing to check)."""
    return not (flags.get("kv_policy") in (None, "none") and flags.get("sink_tokens") is None
                and flags.get("sink_window") is None and flags.get("max_sink_tokens") is None)


def policy_on(opts: dict | None) -> bool:
    """Whether a settings dict (as it travels in the engine's config) turns the policy on."""
    return bool(opts) and opts.get("kv_policy", "none") != "none"


def resolved_settings(opts: dict, policy) -> dict[str, Any]:
    """The checked flags plus what startup resolved (window, block size): everything a
    process needs to rebuild the same policy, as a plain dict the engine can ship."""
    return {**opts, "window_tokens": policy.window_tokens, "block_size": policy.block_size}


def policy_from_settings(opts: dict | None):
    """The policy a resolved settings dict describes; None when the policy is off."""
    if not policy_on(opts):
        return None
    from .policy import SinkPolicy  # noqa: PLC0415 (policy imports this module back)

    return SinkPolicy(opts["sink_tokens"], opts["window_tokens"], opts["block_size"])


def largest_policy_from_settings(opts: dict | None):
    """The policy of the widest request a server admits, ``S`` at ``--max-sink-tokens``
    (per-request sinks): its bounds (live blocks, admission) bound every request's."""
    policy = policy_from_settings(opts)
    return None if policy is None else policy.with_sinks(max(policy.sink_tokens, max_sink_tokens(opts)))
