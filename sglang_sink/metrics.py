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

from streaming_sink import metric_names
from streaming_sink.policy import SinkPolicy

ENGINE = "sglang"  # names and help from the core's table: sglang:streaming_sink_<name>, unit "token"
PREFIX = f"{ENGINE}:{metric_names.PREFIX}"


def kv_token_buckets(policy: SinkPolicy, chunk: int) -> list[float]:
    """Powers of two, plus the policy's own bounds: ``S + W`` (what a request past the
    window holds before a step), ``S + W + 1`` (a decode step's peak) and the prefill
    bound ``max_live_blocks(chunk)``: a request sits exactly on one of them."""
    bounds = {policy.dense_tokens - 1, policy.dense_tokens, policy.max_live_blocks(max(chunk, 1)) * policy.block_size}
    return sorted({float(2 ** k) for k in range(4, 21)} | {float(b) for b in bounds})


class _Request:
    """One running request's share of the gauges, and the most KV slots of its own it held."""

    __slots__ = ("past", "pinned", "live", "peak")

    def __init__(self) -> None:
        self.past = self.pinned = self.live = self.peak = 0


def _series(cls, key: str, labels: dict, **kwargs):
    return cls(name=metric_names.metric_name(ENGINE, key), documentation=metric_names.metric_help(ENGINE, key),
               labelnames=list(labels), **kwargs).labels(**labels)


class SinkMetrics:
    """The core's six series (``streaming_sink.metric_names``), SGLang's unit: tokens (KV
    slots at page size 1), and the running totals behind the gauges.

    Fed by touch points 4/5 (eviction.py) after they act: each step's requests
    (``observe_step``) and each release of a request's KV (``observe_release``: finish,
    abort, retract). Per request, keyed by its eviction cursor: whether it is past the
    window, the sink slots it pins, the slots of its own it holds, the most it held; each
    by the request's own policy (its ``S``: per-request sinks)."""

    def __init__(self, policy: SinkPolicy, labels: dict, chunk: int,
                 gauge_cls=None, counter_cls=None, histogram_cls=None) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        Gauge, Counter, Histogram = gauge_cls or Gauge, counter_cls or Counter, histogram_cls or Histogram
        self.policy = policy
        self.labels = dict(labels)
        gauge = dict(multiprocess_mode="mostrecent")
        self.requests_past_window = _series(Gauge, "requests_past_window", self.labels, **gauge)
        self.sinks_pinned = _series(Gauge, "sinks_pinned", self.labels, **gauge)
        self.live_tokens = _series(Gauge, "live", self.labels, **gauge)
        self.max_live_tokens = _series(Gauge, "max_live", self.labels, **gauge)
        self.recycled_tokens = _series(Counter, "recycled", self.labels)
        self.request_peak = _series(Histogram, "request_peak", self.labels, buckets=kv_token_buckets(policy, chunk))
        self.past = self.pinned = self.live = 0
        self.requests: dict[int, _Request] = {}  # id(cursor) -> its share
        for g in (self.requests_past_window, self.sinks_pinned, self.live_tokens):
            g.set(0)
        self.max_live_tokens.set(policy.dense_tokens)  # S + W + 1: sinks + window + the current token
        # (``policy``: the server's with the largest S a request may carry, --max-sink-tokens)

    def observe_step(self, steps, recycled: int) -> None:
        """One step's eviction: ``steps`` = (cursor, slots of its own held before this step's
        free, and after it, tokens in its cache) per request; ``recycled`` slots went back."""
        for cursor, held, live, tokens_in_cache in steps:
            req = self.requests.setdefault(id(cursor), _Request())
            req.peak = max(req.peak, held)  # held since the previous step's allocation
            policy = cursor.policy  # the request's own (its S)
            past = int(policy.is_streaming(tokens_in_cache // policy.block_size))
            pinned = min(tokens_in_cache, policy.sink_tokens)
            self._move(past - req.past, pinned - req.pinned, live - req.live)
            req.past, req.pinned, req.live = past, pinned, live
        if recycled:
            self.recycled_tokens.inc(recycled)

    def observe_release(self, cursor, held: int) -> None:
        """The request gave its KV back, holding ``held`` slots of its own (its final row)."""
        req = self.requests.pop(id(cursor), None) or _Request()
        self._move(-req.past, -req.pinned, -req.live)
        self.request_peak.observe(max(req.peak, held))

    def forget(self, cursor) -> None:
        """A request whose release was never seen (its cursor was replaced): out of the gauges."""
        req = self.requests.pop(id(cursor), None)
        if req is not None:
            self._move(-req.past, -req.pinned, -req.live)

    def _move(self, d_past: int, d_pinned: int, d_live: int) -> None:
        if d_past:
            self.past += d_past
            self.requests_past_window.set(self.past)
        if d_pinned:
            self.pinned += d_pinned
            self.sinks_pinned.set(self.pinned)
        if d_live:
            self.live += d_live
            self.live_tokens.set(self.live)


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
    # The bounds (max_live, the histogram's buckets) of the largest S a request may carry.
    policy = sink_config.largest_policy(server_args)
    state.metrics = SinkMetrics(policy, collector.labels, server_args.chunked_prefill_size or 1,
                                type(collector)._gauge_cls, type(collector)._counter_cls,
                                type(collector)._histogram_cls)
    logging.getLogger("sglang.streaming_sink").info("streaming-sink: Prometheus metrics %s* on", PREFIX)
    return ctx
