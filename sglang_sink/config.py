"""The policy's settings: how they ride on SGLang's ServerArgs.

``ServerArgs`` is a fixed dataclass (a plugin cannot add fields), so the settings
(``streaming_sink.flags.resolved_settings``) travel as one plain instance attribute,
``streaming_sink``, which pickles with the record into the scheduler processes.
No SGLang import here.
"""

from __future__ import annotations

from streaming_sink.flags import DEFAULT_STREAM_LEN, FLAGS, largest_policy_from_settings, max_sink_tokens, \
    policy_from_settings  # noqa: F401
from streaming_sink.policy import SinkPolicy

ATTR = "streaming_sink"
# With the policy on and no --max-running-requests: the rows of SGLang's
# [max_running_requests, context_length] int32 token table (SGLang's CPU default,
# 2048 rows of 131072 tokens, would be 1 GiB).
DEFAULT_MAX_RUNNING_REQUESTS = 64


def policy_of(server_args) -> SinkPolicy | None:
    """The resolved policy a ServerArgs carries (None: policy off)."""
    return policy_from_settings(getattr(server_args, ATTR, None))


def settings_of(server_args) -> dict | None:
    """The resolved settings a ServerArgs carries (None: policy off)."""
    return getattr(server_args, ATTR, None)


def max_sink_tokens_of(server_args) -> int:
    """The largest ``S`` a request may carry: ``--max-sink-tokens`` (the core's check keeps
    it >= the server's ``--sink-tokens``; per-request sinks, docs/sglang.md)."""
    return max(policy_of(server_args).sink_tokens, max_sink_tokens(settings_of(server_args)))


def largest_policy(server_args) -> SinkPolicy:
    """The server's policy with the largest ``S`` a request may carry: its bounds bound
    every request's."""
    return largest_policy_from_settings(settings_of(server_args))
