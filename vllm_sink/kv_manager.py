"""KV cache spec + manager: pin the sink blocks, recycle the gap behind the window.

Modelled on vLLM's ``SlidingWindowSpec`` / ``SlidingWindowManager`` (v1 core):
the spec subclasses the sliding-window spec so vLLM's recycling-aware
admission cap and startup KV sizing apply, with our own per-request bound;
the manager frees ``[Sb, first window block)`` instead of ``[0, ...)``.
Freed slots become vLLM's null block in the scheduler's table; the worker's
block table keeps the stale ids, which the attention backend never reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from streaming_sink.policy import SinkPolicy


@dataclass(frozen=True, kw_only=True)
class StreamingSinkSpec(SlidingWindowSpec):
    """A decoder layer under the streaming-sink policy (``sliding_window`` = W)."""

    sink_tokens: int

    @property
    def policy(self) -> SinkPolicy:
        return SinkPolicy(self.sink_tokens, self.sliding_window, self.block_size)

    @property
    def prefix_cacheable(self) -> bool:
        # Blocks past the dense regime hold keys rotated at remapped positions
        # that depend on the window; the policy switches prefix caching off.
        return False

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        return min(self.policy.max_live_blocks(max_in_flight_tokens), cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())


class StreamingSinkManager(SlidingWindowManager):
    """Keeps sink blocks ``[0, Sb)`` and window blocks ``[j - Wb, j]`` per request."""

    def __init__(self, kv_cache_spec: StreamingSinkSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.policy = kv_cache_spec.policy

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        gap = self.policy.freeable_prefix_blocks(processed_computed_tokens)
        # Walks back from the window edge and stops at the first null block, so
        # each call frees only what the window has newly left behind.
        self._remove_blocks_in_range(request_id, gap.start, gap.stop)

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        # Only consulted for prefix-cache hits of new requests; caching is off.
        return 0

    @classmethod
    def find_longest_cache_hit(cls, *args, **kwargs):
        raise RuntimeError("prefix caching is not supported with --kv-policy streaming-sink "
                           "(the plugin turns it off at startup)")

    def live_block_count(self, request_id: str) -> int:
        """Blocks this request really holds (diagnostics and tests)."""
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))
