"""Touch points 4 and 5 (hooks.py): the window's slots go back through SGLang's allocator.

SGLang calls ``ScheduleBatch.maybe_evict_swa()`` before every allocation (its hook for
freeing sliding-window slots); ours runs after it: for each request, its own policy's
(its ``S``: state.policy_of) ``freeable_prefix_blocks`` gives the row range no later query reads, and
those slot ids go back with ``token_to_kv_pool_allocator.free``. Freed ids stay in the
request's ``req_to_token`` row (attention never reads them); its cursor (pool.py) makes
the final ``BasePrefixCache.free_kv_row`` skip them, so every slot is freed exactly once,
on finish and abort alike. What was freed is then reported, apart: to the metrics
(``--enable-metrics``) and the trace (``SGLANG_SINK_TRACE``). No SGLang import.
"""

from __future__ import annotations

from .state import state
from .trace import record_step


def evict(original, batch):
    """AROUND ``ScheduleBatch.maybe_evict_swa(self)``."""
    original(batch)
    if state.policy is None:
        return
    allocator = batch.token_to_kv_pool_allocator
    rows = batch.req_to_token_pool.req_to_token
    extend = batch.forward_mode.is_extend()
    steps, held, recycled = [], {}, 0
    for idx, req in enumerate(batch.reqs):
        kv = req.kv
        if not kv.holds_kv:
            continue
        # Tokens whose KV is in the cache before this step's allocation.
        done = int(batch.prefix_lens[idx]) if extend else req.seqlen - 1
        done = min(done, kv.kv_committed_len)
        cursor = state.cursor(kv, state.policy_of(req))
        before = cursor.held(kv.kv_allocated_len)  # since the previous step's allocation
        span = cursor.advance(done)
        if span is not None:
            allocator.free(rows[kv.req_pool_idx, span[0]:span[1]])
            recycled += span[1] - span[0]
        held[req.rid] = cursor.held(kv.kv_allocated_len)
        steps.append((cursor, before, held[req.rid], done))
    if state.metrics is not None:
        state.metrics.observe_step(steps, recycled)
    record_step(allocator, getattr(batch, "tree_cache", None), held)


def free_kv_row(original, cache, kv, ranges):
    """AROUND ``BasePrefixCache.free_kv_row(self, kv, ranges)``: the request's final
    release (finish, abort, retract) frees only what the policy has not freed yet."""
    cursor = state.release(kv)
    if cursor is not None:
        if state.metrics is not None:
            state.metrics.observe_release(cursor, cursor.held(kv.kv_allocated_len))
        ranges = cursor.live_ranges(ranges)
    return original(cache, kv, ranges)
