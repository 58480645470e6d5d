"""The policy's settings as they travel inside vLLM's config.

The flags land in ``VllmConfig.additional_config["streaming_sink"]`` (a plain
dict vLLM already ships to the engine core and every worker), so each process
rebuilds the same ``SinkPolicy`` without any global state of ours. The dict's
contents and the rebuild are the core's (streaming_sink/flags.py).
"""

from __future__ import annotations

from typing import Any

from streaming_sink.flags import DEFAULT_STREAM_LEN, largest_policy_from_settings, policy_from_settings, policy_on
from streaming_sink.policy import SinkPolicy

KEY = "streaming_sink"
__all__ = ["DEFAULT_STREAM_LEN", "KEY", "decode_step_tokens", "policy_of", "settings", "largest_policy_of"]  # DEFAULT_STREAM_LEN: vLLM's default max_model_len


def settings(additional_config: dict | None) -> dict[str, Any] | None:
    """The policy settings of a config, or None when the policy is off."""
    opts = (additional_config or {}).get(KEY)
    return opts if policy_on(opts) else None


def policy_of(vllm_config) -> SinkPolicy | None:
    """The resolved policy of an engine config (after startup resolution)."""
    return policy_from_settings(settings(getattr(vllm_config, "additional_config", None)))


def largest_policy_of(vllm_config) -> SinkPolicy | None:
    """The policy with the largest S a request may carry (--max-sink-tokens): the bounds the
    metrics quote hold for every request."""
    return largest_policy_from_settings(settings(getattr(vllm_config, "additional_config", None)))


def decode_step_tokens(vllm_config) -> int:
    """Tokens one decode step writes per request: 1, plus the drafts a speculative step
    verifies (and any drafter lookahead slots): a decoding request's live-block bound is
    ``policy.max_live_blocks`` of this."""
    return 1 + (vllm_config.num_speculative_tokens or 0) + (vllm_config.num_lookahead_tokens or 0)
