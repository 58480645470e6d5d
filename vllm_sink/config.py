"""The policy's settings as they travel inside vLLM's config.

The flags land in ``VllmConfig.additional_config["streaming_sink"]`` (a plain
dict vLLM already ships to the engine core and every worker), so each process
rebuilds the same ``SinkPolicy`` without any global state of ours.
"""

from __future__ import annotations

from typing import Any

from streaming_sink.policy import DEFAULT_SINK_TOKENS, KV_POLICIES, PolicyConfigError, SinkPolicy

KEY = "streaming_sink"
# How far a request may stream when the user gives no --max-model-len. The
# worker keeps a [max_num_seqs, max_model_len] token table on the host, so this
# is a memory choice, not a limit of the policy; raise it with --max-model-len.
DEFAULT_STREAM_LEN = 131072


def requested(kv_policy: str | None, sink_tokens: int | None, sink_window: int | None) -> dict[str, Any]:
    """The user's flags, checked for what needs no model (the rest waits for it)."""
    kv_policy = kv_policy or "none"
    if kv_policy not in KV_POLICIES:
        raise PolicyConfigError(f"--kv-policy must be one of {', '.join(KV_POLICIES)}, got {kv_policy!r}")
    if kv_policy == "none" and (sink_tokens is not None or sink_window is not None):
        raise PolicyConfigError("--sink-tokens / --sink-window need --kv-policy streaming-sink")
    sink_tokens = DEFAULT_SINK_TOKENS if sink_tokens is None else int(sink_tokens)
    if sink_tokens < 0:
        raise PolicyConfigError(f"--sink-tokens must be >= 0 (0 is plain window attention), got {sink_tokens}")
    if sink_window is not None and int(sink_window) <= 0:
        raise PolicyConfigError(f"--sink-window must be a positive number of tokens, got {sink_window}")
    return {"kv_policy": kv_policy, "sink_tokens": sink_tokens,
            "sink_window": None if sink_window is None else int(sink_window)}


def settings(additional_config: dict | None) -> dict[str, Any] | None:
    """The policy settings of a config, or None when the policy is off."""
    opts = (additional_config or {}).get(KEY)
    if not opts or opts.get("kv_policy", "none") == "none":
        return None
    return opts


def policy_of(vllm_config) -> SinkPolicy | None:
    """The resolved policy of an engine config (after startup resolution)."""
    opts = settings(getattr(vllm_config, "additional_config", None))
    if opts is None:
        return None
    return SinkPolicy(opts["sink_tokens"], opts["window_tokens"], opts["block_size"])
