"""The policy's Prometheus metrics, in SGLang's own ``/metrics`` (``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode: the launcher sets
``PROMETHEUS_MULTIPROC_DIR`` before any process imports prometheus_client, every
process writes its samples to files there, and the HTTP server's ``/metrics``
aggregates them (``MultiProcessCollector``). The policy acts in the scheduler
process, so its metrics are created there, right after SGLang's own scheduler
metrics (touch point 9 of ``hooks.py``: ``SchedulerMetricsCollector.init_new``),
with SGLang's label set (``model_name``, ``engine_type``, ``tp_rank``, ``pp_rank``,
``moe_ep_rank``, ...), only where SGLang's scheduler publishes its own metrics
(``current_scheduler_metrics_enabled``), with SGLang's metric classes (a
``stat_loggers`` override of them is honoured). They are updated from touch
points 4/5 (each step's eviction, each release of a request's KV): exact at every
step, not sampled. prometheus_client is imported only when metrics are on (after
SGLang set the directory). No SGLang import.

All counts are KV slots; SGLang's page size is the policy's block size (1), so
one slot is one token.
"""

from __future__ import annotations

import logging

from streaming_sink.policy import SinkPolicy

PREFIX = "sglang:streaming_sink_"


def kv_token_buckets(policy: SinkPolicy, chunk: int) -> list[float]:
    """Powers of two, plus the policy's own bounds: ``S + W`` (what a request past the
    window holds before a step), ``S + W + 1`` (a decode step's peak) and the prefill
    bound ``max_live_blocks(chunk)``: a request sits exactly on one of them."""
    bounds = {policy.dense_tokens - 1, policy.dense_tokens, policy.max_live_blocks(max(chunk, 1)) * policy.block_size}
    return sorted({float(2 ** k) for k in range(4, 21)} | {float(b) for b in bounds})


class _Request:
    """One running request's share of the gauges, and the most KV slots of its own it held."""

    __slots__ = ("past", "pinned", "peak")

    def __init__(self) -> None:
        self.past = self.pinned = self.peak = 0


class SinkMetrics:
    """The four series, and the running totals behind the two gauges.

    Fed by touch points 4/5 (eviction.py) after they act: each step's requests
    (``observe_step``) and each release of a request's KV (``observe_release``: finish,
    abort, retract). Per request, keyed by its eviction cursor: whether it is past the
    window, the sink slots it pins, the most KV slots of its own it held."""

    def __init__(self, policy: SinkPolicy, labels: dict, chunk: int,
                 gauge_cls=None, counter_cls=None, histogram_cls=None) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        Gauge, Counter, Histogram = gauge_cls or Gauge, counter_cls or Counter, histogram_cls or Histogram
        self.policy = policy
        self.labels = dict(labels)
        names = list(self.labels)
        self.past_window_reqs = Gauge(
            name=PREFIX + "num_past_window_reqs",
            documentation="Running requests past the window (more than sinks + window tokens in the "
                          "cache): they hold the sinks and the window only.",
            labelnames=names, multiprocess_mode="mostrecent").labels(**self.labels)
        self.pinned_tokens = Gauge(
            name=PREFIX + "pinned_sink_tokens",
            documentation="KV slots pinned as attention sinks by running requests (min(S, tokens in "
                          "cache) each; a sink shared through the radix cache counts per request).",
            labelnames=names, multiprocess_mode="mostrecent").labels(**self.labels)
        self.recycled_tokens = Counter(
            name=PREFIX + "recycled_tokens_total",
            documentation="KV slots the policy returned to SGLang's allocator (the gap between the "
                          "sinks and the window).",
            labelnames=names).labels(**self.labels)
        self.live_kv_tokens = Histogram(
            name=PREFIX + "live_kv_tokens_histogram",
            documentation="Per request: the most KV slots of its own it held at once (sinks + window "
                          "+ the step's new tokens), observed when it releases its KV.",
            labelnames=names, buckets=kv_token_buckets(policy, chunk)).labels(**self.labels)
        self.past = self.pinned = 0
        self.requests: dict[int, _Request] = {}  # id(cursor) -> its share
        self.past_window_reqs.set(0)
        self.pinned_tokens.set(0)

    def observe_step(self, steps, recycled: int) -> None:
        """One step's eviction: ``steps`` = (cursor, slots of its own held before this step's
        free, tokens in its cache) per request; ``recycled`` slots went back to the pool."""
        for cursor, held, tokens_in_cache in steps:
            req = self.requests.setdefault(id(cursor), _Request())
            req.peak = max(req.peak, held)  # held since the previous step's allocation
            past = int(self.policy.is_streaming(tokens_in_cache // self.policy.block_size))
            pinned = min(tokens_in_cache, self.policy.sink_tokens)
            self._move(past - req.past, pinned - req.pinned)
            req.past, req.pinned = past, pinned
        if recycled:
            self.recycled_tokens.inc(recycled)

    def observe_release(self, cursor, held: int) -> None:
        """The request gave its KV back, holding ``held`` slots of its own (its final row)."""
        req = self.requests.pop(id(cursor), None) or _Request()
        self._move(-req.past, -req.pinned)
        self.live_kv_tokens.observe(max(req.peak, held))

    def forget(self, cursor) -> None:
        """A request whose release was never seen (its cursor was replaced): out of the gauges."""
        req = self.requests.pop(id(cursor), None)
        if req is not None:
            self._move(-req.past, -req.pinned)

    def _move(self, d_past: int, d_pinned: int) -> None:
        if d_past:
            self.past += d_past
            self.past_window_reqs.set(self.past)
        if d_pinned:
            self.pinned += d_pinned
            self.pinned_tokens.set(self.pinned)


# ---- touch point 9 (hooks.py): SchedulerMetricsCollector.init_new, AFTER ------------------

def on_metrics_collector(ctx, cls, *args, server_args=None, **kwargs):
    """After SGLang built its scheduler metrics: ours, with its labels and metric classes,
    where it publishes its own (one series per scheduler rank that does)."""
    from . import config as sink_config
    from .state import state

    policy = sink_config.policy_of(server_args) if server_args is not None else None
    collector = getattr(ctx, "collector", None)
    if policy is None or collector is None or not ctx.current_scheduler_metrics_enabled:
        return ctx
    state.metrics = SinkMetrics(policy, collector.labels, server_args.chunked_prefill_size or 1,
                                type(collector)._gauge_cls, type(collector)._counter_cls,
                                type(collector)._histogram_cls)
    logging.getLogger("sglang.streaming_sink").info("streaming-sink: Prometheus metrics %s* on", PREFIX)
    return ctx
