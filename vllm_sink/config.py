"""The policy's settings as they travel inside vLLM's config.

The flags land in ``VllmConfig.additional_config["streaming_sink"]`` (a plain
dict vLLM already ships to the engine core and every worker), so each process
rebuilds the same ``SinkPolicy`` without any global state of ours.
"""

from __future__ import annotations

from typing import Any

from streaming_sink.policy import SinkPolicy

KEY = "streaming_sink"
# How far a request may stream when the user gives no --max-model-len. The
# worker keeps a [max_num_seqs, max_model_len] token table on the host, so this
# is a memory choice, not a limit of the policy; raise it with --max-model-len.
DEFAULT_STREAM_LEN = 131072


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
