"""KV cache spec + manager: pin the sink blocks, recycle the gap behind the window,
and reuse cached sink + window blocks across requests (prefix caching).

Modelled on vLLM's ``SlidingWindowSpec`` / ``SlidingWindowManager`` (v1 core):
the spec subclasses the sliding-window spec so vLLM's recycling-aware
admission cap and startup KV sizing apply, with our own per-request bound;
the manager frees ``[Sb, first window block)`` instead of ``[0, ...)``.
Freed slots become vLLM's null block in the scheduler's table; the worker's
block table keeps the stale ids, which the attention backend never reads.

Prefix caching: a block's content is a function of the token prefix ending at
it (positions ``pos(t)`` depend on ``t`` only), so vLLM's chained block hash
names it. A new request resumes at block ``h`` when the blocks its first query
reads are cached: the sinks and the ``Wb`` blocks before ``h``
(``SinkPolicy.longest_hit``); the gap comes back as null blocks, never needed.
vLLM's pool ref-counts the shared blocks; freed ones stay hashed (evictable).
"""

from __future__ import annotations

from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from streaming_sink.policy import SinkPolicy


# The S of the request whose prefix-cache hit vLLM is looking up (find_longest_cache_hit
# is a classmethod without the request): set by hooks/per_request_sinks.py around get_computed_blocks.
LOOKUP_SINK_TOKENS: ContextVar[int | None] = ContextVar("streaming_sink_lookup_sinks", default=None)


@dataclass(frozen=True, kw_only=True)
class StreamingSinkSpec(SlidingWindowSpec):
    """A decoder layer under the streaming-sink policy (``sliding_window`` = W)."""

    sink_tokens: int  # the server default S
    max_sink_tokens: int = 0  # the largest S a request may carry (--max-sink-tokens)

    @property
    def policy(self) -> SinkPolicy:
        return SinkPolicy(self.sink_tokens, self.sliding_window, self.block_size)

    def request_policy(self, sink_tokens: int) -> SinkPolicy:
        """One request's policy: its own S, the server's window and block size."""
        return self.policy.with_sinks(sink_tokens)

    @property
    def largest_policy(self) -> SinkPolicy:
        """The widest request the server admits (S up to the cap): what bounds are quoted for."""
        return self.request_policy(max(self.sink_tokens, self.max_sink_tokens))

    def admission_blocks(self, sink_tokens: int, max_in_flight_tokens: int, max_model_len: int) -> int:
        """A request's admission bound with its own S: Sb + Wb + 1 (+ a chunk's blocks)."""
        return min(self.request_policy(sink_tokens).max_live_blocks(max_in_flight_tokens),
                   cdiv(max_model_len, self.block_size))

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        # A speculative step writes 1 + k tokens per request (n-gram drafts, verified in
        # one pass): within one step's budget, so max_in_flight_tokens (a batch per
        # concurrent step) already covers the extra block the drafts may cross into.
        # Startup KV sizing: the widest request the server admits (S up to the cap).
        return self.admission_blocks(self.largest_policy.sink_tokens, max_in_flight_tokens, max_model_len)

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(spec == self for spec in kv_cache_specs.values())


class StreamingSinkManager(SlidingWindowManager):
    """Keeps sink blocks ``[0, Sb)`` and window blocks ``[j - Wb, j]`` per request."""

    def __init__(self, kv_cache_spec: StreamingSinkSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.policy = kv_cache_spec.policy  # the server default's (requests without their own S)
        self.largest_policy = kv_cache_spec.largest_policy  # S at the cap: the bounds metrics quote
        # Per-request sinks: each running request's S (hooks/per_request_sinks.py registers it from the
        # request before vLLM looks up its hit or allocates for it; gone when it frees).
        self._policies: dict[str, SinkPolicy] = {}  # built once per request, read every step
        self._admission_limits: tuple[int, int] | None = None  # (max_in_flight_tokens, max_model_len)
        # Metrics (vllm_sink/metrics.py): blocks the window left behind and freed,
        # and each request's peak live blocks, reported when it releases them.
        self.recycled_blocks = 0
        self._peak: dict[str, int] = {}
        self.released_peaks: OrderedDict[str, int] = OrderedDict()

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        # vLLM passes the tokens processed: computed minus in flight, after the rejected
        # drafts of a speculative step are rolled back; so only accepted tokens move the
        # window, and every query of the next (verification) step is at or past them.
        policy = self.policy_of(request_id)
        gap = policy.freeable_prefix_blocks(processed_computed_tokens)
        blocks = self.req_to_blocks.get(request_id)
        if not gap or not blocks:
            return  # dense: nothing to free
        # Walks back from the window edge and stops at the first null block, so
        # each call frees only what the window has newly left behind: the blocks
        # from the end of the null run to the gap's end.
        freed = min(gap.stop, len(blocks)) - self._gap_end(blocks, policy)
        self._remove_blocks_in_range(request_id, gap.start, gap.stop)
        self.recycled_blocks += max(0, freed)

    def pop_blocks_for_free(self, request_id: str) -> list:
        # Both release paths (free, and the coordinator's deferred free) come here.
        blocks = self.req_to_blocks.get(request_id)
        peak = self._peak.pop(request_id, 0)
        if blocks:
            self.released_peaks[request_id] = max(peak, self._live(blocks, self.policy_of(request_id))[2])
            while len(self.released_peaks) > 4096:  # nobody drains them with --disable-log-stats
                self.released_peaks.popitem(last=False)
        popped = super().pop_blocks_for_free(request_id)
        self._policies.pop(request_id, None)  # registered again if it comes back (preemption)
        return popped

    # ---- per-request sinks ------------------------------------------------------
    def set_request_sinks(self, request_id: str, sink_tokens: int) -> None:
        if sink_tokens == self.policy.sink_tokens:
            self._policies.pop(request_id, None)
        else:
            self._policies[request_id] = self.policy.with_sinks(sink_tokens)

    def policy_of(self, request_id: str) -> SinkPolicy:
        """The request's own policy (the default's when it carries no S of its own)."""
        return self._policies.get(request_id, self.policy)

    def set_admission_limits(self, max_in_flight_tokens: int, max_model_len: int) -> None:
        """What vLLM sized the admission bound with (KVCacheManager's arguments): each
        request is then admitted at its own Sb + Wb + 1 (+ chunk), not the cap's."""
        self._admission_limits = (max_in_flight_tokens, max_model_len)

    # ---- what the policy is doing, for metrics (no effect on scheduling) ----
    def _gap_end(self, blocks, policy: SinkPolicy | None = None) -> int:
        """End of the null run at ``Sb``. A request's table is always ``Sb`` sink
        blocks, then null blocks (recycled, or the gap of a prefix hit), then live
        window blocks, so a binary search finds it: O(log n) for a 1M-token stream."""
        lo, hi = min((policy or self.policy).sink_blocks, len(blocks)), len(blocks)
        while lo < hi:
            mid = (lo + hi) // 2
            if blocks[mid].is_null:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _live(self, blocks, policy: SinkPolicy | None = None) -> tuple[int, int, int]:
        """(sink blocks held, end of the null run, live blocks) of one request's table."""
        policy = policy or self.policy
        pinned = sum(not b.is_null for b in blocks[:policy.sink_blocks])
        gap_end = self._gap_end(blocks, policy)
        return pinned, gap_end, pinned + len(blocks) - gap_end

    def policy_stats(self) -> dict[str, int]:
        """Requests holding blocks: how many are past the window (a recycled gap),
        their pinned sink blocks and live blocks; updates each one's peak."""
        past = sinks = live = 0
        for request_id, blocks in self.req_to_blocks.items():
            policy = self.policy_of(request_id)
            sb = policy.sink_blocks
            pinned, gap_end, n = self._live(blocks, policy)
            live += n
            sinks += pinned
            past += gap_end > min(sb, len(blocks))  # a null run after the sinks
            if n > self._peak.get(request_id, 0):
                self._peak[request_id] = n
        return {"requests_past_window": past, "sink_blocks": sinks, "live_blocks": live,
                "recycled_blocks": self.recycled_blocks}

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        # vLLM's notion of skipped tokens is a leading run; ours is a gap after the
        # sinks (null blocks inside a hit, counted as hit blocks), so none lead.
        return 0

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length: int, kv_cache_group_ids: list[int],
                               block_pool, kv_cache_spec: StreamingSinkSpec, drop_eagle_block: bool,
                               alignment_tokens: int, dcp_world_size: int = 1, pcp_world_size: int = 1):
        bs = kv_cache_spec.block_size
        # Refused at startup (EAGLE/MTP drafters, which ask to drop the hit's last block
        # for their own KV: hooks/engine_config.py check_speculative; DCP/PCP; a second block size): say
        # so here too rather than return a hit on other terms. n-gram drafts need no drop.
        if drop_eagle_block or dcp_world_size > 1 or pcp_world_size > 1 or alignment_tokens != bs:
            raise RuntimeError("streaming-sink prefix caching: EAGLE/MTP block drop, DCP/PCP and hit "
                               f"alignments other than whole {bs}-token blocks are not supported")
        block_hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, bs)
        found: dict[int, list] = {}

        def cached(b: int) -> bool:
            blocks = block_pool.get_cached_block(block_hashes[b], kv_cache_group_ids)
            if blocks:
                found[b] = blocks
            return bool(blocks)

        # The looked-up request's own S (hooks/per_request_sinks.py sets it around vLLM's lookup; the hash
        # chain already keeps other-S requests apart, its S decides which blocks it reads).
        s = LOOKUP_SINK_TOKENS.get()
        policy = kv_cache_spec.policy if s is None else kv_cache_spec.request_policy(s)
        h = policy.longest_hit(min(max_length // bs, len(block_hashes)), cached)
        hit = [[block_pool.null_block] * h for _ in kv_cache_group_ids]
        for b in policy.hit_blocks(h):
            for group, block in zip(hit, found[b]):
                group[b] = block
        return tuple(hit), h * bs

    @classmethod
    def reachable_block_mask(cls, *args, **kwargs):
        # Cache every full block: vLLM's sliding-window mask would drop the sinks.
        return None

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, apply_admission_cap: bool = False,
                                   prefill_end: int = 0) -> int:
        cap = self.max_admission_blocks_per_request
        if apply_admission_cap and self._admission_limits is not None and cap is not None:
            # The request's own bound (its S), not the widest one vLLM sized the pool for.
            own = self.kv_cache_spec.admission_blocks(
                self.policy_of(request_id).sink_tokens, *self._admission_limits)
            if own < cap:
                self.max_admission_blocks_per_request = own
                try:
                    return self.get_num_blocks_to_allocate(
                        request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                        num_local_computed_tokens, num_tokens_main_model, apply_admission_cap, prefill_end)
                finally:
                    self.max_admission_blocks_per_request = cap
        n = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model, apply_admission_cap, prefill_end)
        if not (apply_admission_cap and new_computed_blocks) or cap is None or request_id in self.num_cached_block:
            return n
        # Admission of a request with a hit: vLLM subtracts the hit's length (gap
        # included) from the capped need. Held is what the hit really holds; the
        # request grows to at most the cap, and never past its own tokens.
        held = sum(not b.is_null for b in new_computed_blocks)
        grow = cdiv(num_tokens, self.block_size) - len(new_computed_blocks)
        new = max(0, min(grow, cap - held))
        return new + self._get_num_evictable_blocks(new_computed_blocks)
