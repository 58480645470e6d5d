"""The policy's settings: how they ride on SGLang's ServerArgs.

``ServerArgs`` is a fixed dataclass (a plugin cannot add fields), so the
settings travel as one plain instance attribute, ``streaming_sink``, which
pickles with the record into the scheduler processes. No SGLang import here.
"""

from __future__ import annotations


from streaming_sink.policy import SinkPolicy

ATTR = "streaming_sink"
FLAGS = ("kv_policy", "sink_tokens", "sink_window")
# A request's whole stream when the user gives no --context-length. SGLang keeps a
# [max_running_requests, context_length] int32 token table, so this is a memory
# choice, not a limit of the policy (vllm_sink uses the same default).
DEFAULT_STREAM_LEN = 131072
# With the policy on and no --max-running-requests: that table's rows (SGLang's CPU
# default, 2048 rows of 131072 tokens, would be 1 GiB).
DEFAULT_MAX_RUNNING_REQUESTS = 64


def policy_of(server_args) -> SinkPolicy | None:
    """The resolved policy a ServerArgs carries (None: policy off)."""
    opts = getattr(server_args, ATTR, None)
    if not opts:
        return None
    return SinkPolicy(opts["sink_tokens"], opts["window_tokens"], opts["block_size"])
