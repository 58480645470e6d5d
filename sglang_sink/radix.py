"""SGLang's radix (prefix) cache under the streaming-sink policy.

Why reuse is sound: a token's cached K/V is a pure function of the token prefix that
ends at it (it is written at ``pos(t)``, a function of ``t`` only, after attending keys
that depend only on earlier tokens). So any request whose prefix matches through ``t``
may read it. A request that resumes after a cached prefix of ``h`` tokens needs only
what its first query at ``h`` reads: the sinks ``[0, S)`` and the window
``[h - W, h)``; in the dense regime (``h <= S + W``) all of ``[0, h)``. The gap
between them is never read again.

So the tree stores every token of a finished request, but the slots the policy already
gave back (the gap) are **tombstones** (slot id ``-1``) in the node values, as SGLang's
SWA caches keep tombstones for a sliding window's freed KV. ``match_prefix`` returns
the longest matched ``h`` whose needed tokens are all live; a match that ends in a gap
falls back to the last live window (or the dense head), never to a tombstone.

What changes from ``RadixCache`` (everything else is SGLang's, including lock/ref
counting, LRU eviction of unlocked leaves, splitting):

* sizes (evictable / protected) count live slots only, so SGLang's idle leak check
  (available + evictable + protected == total) holds with tombstones in the tree;
* eviction frees a leaf's live slots only; a leaf of tombstones goes for free;
* a running request is not published mid-run (``checkpoint`` of an unfinished request
  is a no-op, as for SGLang's ``skip_radix_cache_insert``): the tree lock would pin the
  slots its window leaves. It is inserted once, when it finishes, with its freed gap
  as tombstones; of the slots it computed that the tree already held, its own live
  ones go back to the allocator.

The request side (``hooks.py``, touch points 4/5): a request that matched ``h`` owns
row positions from ``h`` on (SGLang's ``cache_protected_len``); its eviction never
frees a tree-owned slot (the tree's lock keeps those for it, shared with every other
request reading them).
"""

from __future__ import annotations

import torch

from streaming_sink.policy import SinkPolicy

TOMBSTONE = -1  # a slot the policy already returned to the allocator


def longest_valid_prefix(values: torch.Tensor, policy: SinkPolicy) -> int:
    """The longest ``h <= len(values)`` a request may resume from, given the matched
    path's slot ids (``TOMBSTONE`` where freed): dense ``h <= S + W`` needs ``[0, h)``
    live; a streaming ``h`` needs ``[0, S)`` and ``[h - W, h)`` live."""
    if policy.block_size != 1:
        raise ValueError("SGLang's token pool is paged by 1")
    m = int(values.numel())
    tombs = torch.nonzero(values < 0).flatten()
    if tombs.numel() == 0:
        return m
    s, w = policy.sink_tokens, policy.window_tokens
    first = int(tombs[0])
    if first >= s:  # sinks live: the rightmost tombstone-free run of >= W ending past S + W
        bounds = torch.cat([tombs.new_tensor([-1]), tombs, tombs.new_tensor([m])])
        ends = bounds[1:]
        ok = ((ends - bounds[:-1] - 1) >= w) & (ends > s + w)
        if bool(ok.any()):
            return int(ends[ok][-1])
    return min(m, s + w, first)  # dense: all of [0, h) live


def make_cache_class():
    """``StreamingRadixCache``, built on first use (imports SGLang)."""
    from sglang.srt.mem_cache.base_prefix_cache import (
        DecLockRefResult,
        EvictResult,
        IncLockRefResult,
        InsertParams,
        MatchPrefixParams,
        MatchResult,
    )
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    import heapq

    def live(node) -> int:
        """Live slots of a node's value (cached per value tensor: a split makes new ones)."""
        v = node.value
        if v is None or not isinstance(v, torch.Tensor):
            return 0
        if node.__dict__.get("_sink_v") is not v:
            node._sink_v, node._sink_live = v, int((v >= 0).sum())
        return node._sink_live

    class StreamingRadixCache(RadixCache):
        def __init__(self, params, policy: SinkPolicy, freed_range):
            self.policy = policy
            self._freed_range = freed_range  # kv -> (lo, hi): row positions the request freed
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
                    self.live_evictable -= live(n)
                    self.live_protected += live(n)
                    delta -= live(n)
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
                    self.live_evictable += live(n)
                    self.live_protected -= live(n)
                    delta += live(n)
                n = n.parent
            super().dec_lock_ref(node, params)
            return DecLockRefResult(delta=delta)

        def _insert_helper(self, node, key, value, priority=0, inserted_len=0):
            before = self.evictable_size_
            prefix_len, last = super()._insert_helper(node, key, value, priority, inserted_len)
            if self.evictable_size_ > before:  # a new (unlocked) leaf holds the key's tail
                self.live_evictable += live(last)
            return prefix_len, last

        def _delete_leaf(self, node):
            n = live(node)
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
            h = longest_valid_prefix(torch.cat(values), self.policy) if values else 0
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
            lo, hi = self._freed_range(kv)
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

    return StreamingRadixCache
