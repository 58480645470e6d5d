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

The request side (``eviction.py``, touch points 4/5): a request that matched ``h`` owns
row positions from ``h`` on (SGLang's ``cache_protected_len``); its eviction never
frees a tree-owned slot (the tree's lock keeps those for it, shared with every other
request reading them).

This module holds the engine-free rule (``longest_valid_prefix``, no SGLang import);
the cache itself, a ``RadixCache`` subclass, is ``radix_cache.StreamingRadixCache``.
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
