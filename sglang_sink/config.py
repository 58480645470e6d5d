"""The policy's settings: flag checks and how they ride on SGLang's ServerArgs.

``ServerArgs`` is a fixed dataclass (a plugin cannot add fields), so the
settings travel as one plain instance attribute, ``streaming_sink``, which
pickles with the record into the scheduler processes. No SGLang import here.
"""

from __future__ import annotations

from typing import Any

from streaming_sink.policy import DEFAULT_SINK_TOKENS, KV_POLICIES, PolicyConfigError, SinkPolicy

ATTR = "streaming_sink"
FLAGS = ("kv_policy", "sink_tokens", "sink_window")
# A request's whole stream when the user gives no --context-length. SGLang keeps a
# [max_running_requests, context_length] int32 token table, so this is a memory
# choice, not a limit of the policy (vllm_sink uses the same default).
DEFAULT_STREAM_LEN = 131072
# With the policy on and no --max-running-requests: that table's rows (SGLang's CPU
# default, 2048 rows of 131072 tokens, would be 1 GiB).
DEFAULT_MAX_RUNNING_REQUESTS = 64


def requested(kv_policy: str | None, sink_tokens: int | None, sink_window: int | None) -> dict[str, Any] | None:
    """The user's flags checked for what needs no model; None when the policy is off.
    Same rules and messages as vllm_sink/config.py:requested."""
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


def policy_of(server_args) -> SinkPolicy | None:
    """The resolved policy a ServerArgs carries (None: policy off)."""
    opts = getattr(server_args, ATTR, None)
    if not opts:
        return None
    return SinkPolicy(opts["sink_tokens"], opts["window_tokens"], opts["block_size"])
