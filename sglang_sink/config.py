"""The policy's settings: how they ride on SGLang's ServerArgs.

``ServerArgs`` is a fixed dataclass (a plugin cannot add fields), so the settings
(``streaming_sink.flags.resolved_settings``) travel as one plain instance attribute,
``streaming_sink``, which pickles with the record into the scheduler processes.
No SGLang import here.
"""

from __future__ import annotations

from streaming_sink.flags import DEFAULT_STREAM_LEN, FLAGS, policy_from_settings  # noqa: F401 (re-exported)
from streaming_sink.policy import SinkPolicy

ATTR = "streaming_sink"
# With the policy on and no --max-running-requests: the rows of SGLang's
# [max_running_requests, context_length] int32 token table (SGLang's CPU default,
# 2048 rows of 131072 tokens, would be 1 GiB).
DEFAULT_MAX_RUNNING_REQUESTS = 64


def policy_of(server_args) -> SinkPolicy | None:
    """The resolved policy a ServerArgs carries (None: policy off)."""
    return policy_from_settings(getattr(server_args, ATTR, None))
