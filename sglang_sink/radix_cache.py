"""Touch point 8 (hooks.py): SGLang's radix cache under the policy, ``StreamingRadixCache``.

The rules and why they are sound: radix.py. Registered with SGLang's public
``register_radix_cache_backend`` as ``streaming-sink`` (flags.py selects it as the
default ``--radix-cache-backend``). Relies on ``RadixCache``'s ``_match_prefix_helper``,
``_insert_helper``, ``_delete_leaf``, ``_split_node`` (through the re-walk in
``match_prefix``), lock/ref counting, ``evictable_leaves``, ``eviction_strategy``,
``evictable_size_``, ``root_node``, ``_empty_match_result``, ``kv_events``, and on
``ReqKvInfo.cache_protected_len`` / ``cache_inserted_len`` (all in ``hooks.hook_targets``).
Imports SGLang: loaded only in SGLang's processes.
"""

from __future__ import annotations

import heapq

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    DecLockRefResult,
    EvictResult,
    IncLockRefResult,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from streaming_sink.policy import PolicyConfigError, SinkPolicy

from . import config as sink_config
from .radix import TOMBSTONE, longest_valid_prefix
from .state import state


def _live(node) -> int:
    """Live slots of a node's value (cached per value tensor: a split makes new ones)."""
    v = node.value
    if v is None or not isinstance(v, torch.Tensor):
        return 0
    if node.__dict__.get("_sink_v") is not v:
        node._sink_v, node._sink_live = v, int((v >= 0).sum())
    return node._sink_live


class StreamingRadixCache(RadixCache):
    """SGLang's ``RadixCache`` with the policy's gap as tombstones (radix.py says why)."""

    def __init__(self, params, policy: SinkPolicy):
        self.policy = policy
        super().__init__(params)

    # ---- sizes: live slots only --------------------------------------
    def reset(self):
        super().reset()
        self.live_evictable = self.live_protected = 0

    def evictable_size(self):
        return self.live_evictable

    def protected_size(self):
        return self.live_protected

    def full_evictable_size(self):
        return self.live_evictable

    def full_protected_size(self):
        return self.live_protected

    def inc_lock_ref(self, node) -> IncLockRefResult:
        if self.disable:
            return IncLockRefResult(delta=0)
        delta = 0
        n = node
        while n != self.root_node:
            if n.lock_ref == 0:
                self.live_evictable -= _live(n)
                self.live_protected += _live(n)
                delta -= _live(n)
            n = n.parent
        super().inc_lock_ref(node)
        return IncLockRefResult(delta=delta)

    def dec_lock_ref(self, node, params=None) -> DecLockRefResult:
        if self.disable:
            return DecLockRefResult(delta=0)
        delta = 0
        n = node
        while n != self.root_node:
            if n.lock_ref == 1:
                self.live_evictable += _live(n)
                self.live_protected -= _live(n)
                delta += _live(n)
            n = n.parent
        super().dec_lock_ref(node, params)
        return DecLockRefResult(delta=delta)

    def _insert_helper(self, node, key, value, priority=0, inserted_len=0):
        before = self.evictable_size_
        prefix_len, last = super()._insert_helper(node, key, value, priority, inserted_len)
        if self.evictable_size_ > before:  # a new (unlocked) leaf holds the key's tail
            self.live_evictable += _live(last)
        return prefix_len, last

    def _delete_leaf(self, node):
        n = _live(node)
        super()._delete_leaf(node)
        if node.lock_ref == 0:
            self.live_evictable -= n

    def _total_size_helper(self):
        return self.live_evictable + self.live_protected

    # ---- eviction: a leaf's live slots ------------------------------
    def evict(self, params) -> EvictResult:
        if self.disable:
            return EvictResult()
        heap = [(self.eviction_strategy.get_priority(n), n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        evicted = 0
        while evicted < params.num_tokens and heap:
            _, x = heapq.heappop(heap)
            slots = x.value[x.value >= 0]
            if slots.numel():
                self.token_to_kv_pool_allocator.free(slots)
            evicted += int(slots.numel())
            self._delete_leaf(x)
            if len(x.parent.children) == 0 and x.parent.lock_ref == 0 and x.parent is not self.root_node:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(x.parent), x.parent))
            self.kv_events.record_remove(x)
        return EvictResult(num_tokens_evicted=evicted)

    # ---- matching: the longest prefix whose needed tokens are live ----
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key = params.key
        if self.disable or len(key) == 0:
            return super().match_prefix(params)
        values, node = self._match_prefix_helper(self.root_node, key)
        m = sum(len(v) for v in values)
        # The request's own S (per-request sinks); its key's extra_key carries a non-default S
        # (radix.sink_extra_key), so every node on this path was written with the same S.
        policy = self.policy if params.req is None or state.policy is None else state.policy_of(params.req)
        h = longest_valid_prefix(torch.cat(values), policy) if values else 0
        if h == 0:
            return self._empty_match_result
        if h < m:  # re-walk to h: splits the node there, so the lock ends at h
            values, node = self._match_prefix_helper(self.root_node, key[:h])
            assert sum(len(v) for v in values) == h
        return MatchResult(device_prefix_len=h, last_device_node=node,
                           last_host_node=node, best_match_node=node)

    # ---- insertion: once, when the request finishes -------------------
    def checkpoint(self, req, *, up_to: int, **kwargs):
        if self.disable or not req.finished():
            return  # the request's own lock would pin the slots its window leaves
        kv = req.kv
        protected = kv.cache_protected_len
        values = self.req_to_token_pool.req_to_token[kv.req_pool_idx, :up_to].to(torch.int64, copy=True)
        lo, hi = state.freed_range(kv)  # row positions the request freed
        values[lo:min(hi, up_to)] = TOMBSTONE
        key = RadixKey(req.full_untruncated_fill_ids[:up_to], req.extra_key, cache_salt=req.cache_salt)
        result = self.insert(InsertParams(key=key, value=values, inserted_len=kv.cache_inserted_len,
                                          priority=req.priority or 0))
        kv.cache_inserted_len = max(kv.cache_inserted_len, up_to)
        dup = values[protected:result.prefix_len]  # computed by us, already in the tree
        dup = dup[dup >= 0]
        if dup.numel():
            self.token_to_kv_pool_allocator.free(dup)
        _, node = self._match_prefix_helper(self.root_node, key)
        kv.cache_protected_len = up_to  # the tree owns the whole row now
        self.unlock(req.lock)
        req.lock = self.lock(node)
        req.last_node = node


def make_radix_cache(ctx) -> StreamingRadixCache:
    """SGLang's factory for ``--radix-cache-backend streaming-sink`` (flags.py sets it when
    the radix cache is on)."""
    from .hooks import RADIX_BACKEND

    policy = sink_config.policy_of(ctx.server_args)
    if policy is None:
        raise PolicyConfigError(f"--radix-cache-backend {RADIX_BACKEND} needs --kv-policy streaming-sink")
    return StreamingRadixCache(ctx.params, policy)
