"""The three flags, for every engine: names, defaults, help text, validation, and how
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

FLAGS = ("kv_policy", "sink_tokens", "sink_window")  # argparse dests and engine keywords
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


def add_flags(parser, engine: str) -> None:
    """``--kv-policy --sink-tokens --sink-window`` as one argument group of ``parser``
    (an argparse parser or group container; ``engine``: "vllm" or "sglang")."""
    unit, doc, window_rule = _ENGINE_HELP[engine]
    group = parser.add_argument_group(
        "streaming-sink", "StreamingLLM attention sinks: stream past the context window "
        f"with bounded KV memory ({doc}).")
    group.add_argument("--kv-policy", choices=list(KV_POLICIES), default="none",
                       help="KV cache policy. 'streaming-sink' pins the first --sink-tokens "
                            f"tokens and keeps a sliding window of recent KV {unit}.")
    # Engines' help formatters append "(default: None)"; the help says what None means.
    group.add_argument("--sink-tokens", type=int, default=None,
                       help=f"Tokens kept forever as attention sinks; None means {DEFAULT_SINK_TOKENS} "
                            "(0: plain window attention, the baseline that collapses).")
    group.add_argument("--sink-window", type=int, default=None,
                       help=f"Recent tokens kept{window_rule}; None means the largest window the "
                            "model's rotary table allows.")


def check_flags(kv_policy: str | None, sink_tokens: int | None, sink_window: int | None) -> dict | None:
    """The user's three flags, checked for what needs no model (the rest waits for
    it); the same rules and messages for every engine. None when the policy is off."""
    kv_policy = kv_policy or "none"
    if kv_policy not in KV_POLICIES:
        raise PolicyConfigError(f"--kv-policy must be one of {', '.join(KV_POLICIES)}, got {kv_policy!r}")
    if kv_policy == "none":
        if sink_tokens is not None or sink_window is not None:
            raise PolicyConfigError("--sink-tokens / --sink-window need --kv-policy streaming-sink")
        return None
    sink_tokens = DEFAULT_SINK_TOKENS if sink_tokens is None else int(sink_tokens)
    if sink_tokens < 0:
        raise PolicyConfigError(f"--sink-tokens must be >= 0 (0 is plain window attention), got {sink_tokens}")
    if sink_window is not None and int(sink_window) <= 0:
        raise PolicyConfigError(f"--sink-window must be a positive number of tokens, got {sink_window}")
    return {"kv_policy": kv_policy, "sink_tokens": sink_tokens,
            "sink_window": None if sink_window is None else int(sink_window)}


def flags_given(flags: dict) -> bool:
    """Whether the user touched any of the three flags (all unset: nothing to check)."""
    return not (flags.get("kv_policy") in (None, "none") and flags.get("sink_tokens") is None
                and flags.get("sink_window") is None)


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
