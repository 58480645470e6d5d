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

from streaming_sink.policy import SinkPolicy

PREFIX = "sglang:streaming_sink_"


def kv_token_buckets(policy: SinkPolicy, chunk: int) -> list[float]:
    """Powers of two, plus the policy's own bounds: ``S + W`` (what a request past the
    window holds before a step), ``S + W + 1`` (a decode step's peak) and the prefill
    bound ``max_live_blocks(chunk)``: a request sits exactly on one of them."""
    bounds = {policy.dense_tokens - 1, policy.dense_tokens, policy.max_live_blocks(max(chunk, 1)) * policy.block_size}
    return sorted({float(2 ** k) for k in range(4, 21)} | {float(b) for b in bounds})


class SinkMetrics:
    """The four series, and the running totals behind the two gauges.

    Per request (stored on its ``EvictionCursor``): whether it is past the window,
    the sink slots it pins, the most KV slots of its own it held. A request
    leaves the totals when its KV is released (finish, abort, retract)."""

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
        self.past_window_reqs.set(0)
        self.pinned_tokens.set(0)

    def update(self, cursor, tokens_in_cache: int) -> None:
        """A request's state before a step's allocation (after the policy's free)."""
        past = int(self.policy.is_streaming(tokens_in_cache // self.policy.block_size))
        pinned = min(tokens_in_cache, self.policy.sink_tokens)
        d_past, d_pinned = past - cursor.past, pinned - cursor.pinned
        cursor.past, cursor.pinned = past, pinned
        self._move(d_past, d_pinned)

    def recycled(self, slots: int) -> None:
        if slots:
            self.recycled_tokens.inc(slots)

    def release(self, cursor, observe: bool = True) -> None:
        """The request gave its KV back (``observe``: it was a real release, not a stale entry)."""
        self._move(-cursor.past, -cursor.pinned)
        cursor.past = cursor.pinned = 0
        if observe:
            self.live_kv_tokens.observe(cursor.peak)

    def _move(self, d_past: int, d_pinned: int) -> None:
        if d_past:
            self.past += d_past
            self.past_window_reqs.set(self.past)
        if d_pinned:
            self.pinned += d_pinned
            self.pinned_tokens.set(self.pinned)
