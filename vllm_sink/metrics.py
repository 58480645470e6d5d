"""The policy's metrics on vLLM's own ``/metrics`` (Prometheus), in vLLM's style.

The numbers are measured in the engine core, where the KV blocks live
(``StreamingSinkManager.policy_stats``), and reach the frontend inside the
``SchedulerStats`` of each step (hooks/scheduler_stats.py, touch point 7). This module is the
frontend's side: a stat logger plugin (entry point group
``vllm.stat_logger_plugins``, pyproject.toml) that keeps the latest values per
engine and serves them through one collector in prometheus_client's default
registry, which vLLM's ``/metrics`` route serves.

A collector, not ``Gauge``/``Counter`` objects: vLLM's own Prometheus logger is
built after the plugin loggers and unregisters every metric object named
``vllm:*`` it finds (``unregister_vllm_metrics``); a collector has no such name.

Several API servers (``--api-server-count > 1``, or data parallel, which starts one
per rank): vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` and its ``/metrics`` serves only
what every process wrote there (prometheus_client's multiprocess mode, merged on each
scrape). The series are then prometheus_client metric objects writing to that
directory (``_FileEngine``), merged as vLLM merges its own: gauges the most recent
value any process set ("mostrecent"), the counter and histogram summed over the
processes. Each step's ``SchedulerStats`` reaches one API server only, so each process
adds what it was sent: the blocks recycled since the previous stats and the peaks
released since then; their sums are the totals.

    vllm:streaming_sink_requests_past_window     gauge    requests whose window has moved past the sinks
    vllm:streaming_sink_sink_blocks_pinned       gauge    KV blocks held as sinks by requests in the engine
    vllm:streaming_sink_live_blocks              gauge    KV blocks held by requests under the policy
    vllm:streaming_sink_max_live_blocks          gauge    the bound on one decoding request's blocks (S at --max-sink-tokens)
    vllm:streaming_sink_recycled_blocks_total    counter  blocks the window left behind and returned to the pool
    vllm:streaming_sink_request_live_blocks      histogram a request's peak live blocks, when it releases them
                                                          (edges at both bounds: decoding, and mid-prefill)
"""

from __future__ import annotations

import os
import threading

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from streaming_sink.metric_names import metric_help, metric_name
from vllm.v1.metrics.loggers import StatLoggerBase

from . import config as sink_config
from .hooks import STATS_FIELD

LABELS = ["model_name", "engine"]


def live_block_buckets(*bounds: int) -> list[float]:
    """1-2-5 buckets up to the largest bound, with each bound itself an edge (a
    decoding request's, and one mid-prefill with a full chunk): a request at a
    bound lands in its bucket, anything above the largest shows in +Inf."""
    top = max(bounds)
    edges, m = {float(b) for b in bounds}, 1
    while m <= top:
        edges.update(float(m * k) for k in (1, 2, 5) if m * k <= top)
        m *= 10
    return sorted(edges)


# (our key in the stats dict, the core's metric key) of each gauge
GAUGES = (("requests_past_window", "requests_past_window"), ("sink_blocks", "sinks_pinned"),
          ("live_blocks", "live"), ("max_live_blocks", "max_live"))


def multiprocess_mode() -> bool:
    """Whether vLLM's /metrics serves prometheus_client's multiprocess files (its own
    test: ``vllm.v1.metrics.prometheus.get_prometheus_registry``)."""
    return os.getenv("PROMETHEUS_MULTIPROC_DIR") is not None


class _Engine:
    def __init__(self, labels: list[str], bound: int, chunk_bound: int) -> None:
        self.labels = labels
        self.gauges = {"requests_past_window": 0, "sink_blocks": 0, "live_blocks": 0,
                       "max_live_blocks": bound}
        self.recycled = 0
        self.buckets = live_block_buckets(bound, chunk_bound)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def update(self, stats: dict) -> None:
        for key in self.gauges:
            self.gauges[key] = stats.get(key, self.gauges[key])
        self.recycled = stats.get("recycled_blocks", self.recycled)
        for peak in stats.get("released_peaks", ()):
            self.sum += peak
            i = next((i for i, edge in enumerate(self.buckets) if peak <= edge), len(self.buckets))
            self.counts[i] += 1


class _Collector:
    """One per frontend process; each engine's logger adds its labelled state."""

    def __init__(self) -> None:
        self.engines: dict[int, _Engine] = {}
        self.lock = threading.Lock()  # records come from vLLM's output loop, scrapes from the server

    def collect(self):
        with self.lock:
            engines = list(self.engines.values())
            # names and help from the core (one meaning per quantity, vLLM's unit: blocks)
            def family(cls, key):
                return cls(metric_name("vllm", key), metric_help("vllm", key), labels=LABELS)

            gauges = {ours: family(GaugeMetricFamily, key) for ours, key in GAUGES}
            recycled = family(CounterMetricFamily, "recycled")
            hist = family(HistogramMetricFamily, "request_peak")
            for e in engines:
                for key, family in gauges.items():
                    family.add_metric(e.labels, e.gauges[key])
                recycled.add_metric(e.labels, e.recycled)
                cumulative, buckets = 0, []
                for edge, count in zip([*e.buckets, float("inf")], e.counts):
                    cumulative += count
                    buckets.append(("+Inf" if edge == float("inf") else str(edge), cumulative))
                hist.add_metric(e.labels, buckets, e.sum)
        if engines:
            yield from gauges.values()
            yield recycled
            yield hist


class _FileEngine:
    """One engine's series in multiprocess mode: metric objects that write to
    PROMETHEUS_MULTIPROC_DIR (the module docstring says how they merge)."""

    def __init__(self, labels: list[str], bound: int, chunk_bound: int) -> None:
        series = _file_series(live_block_buckets(bound, chunk_bound))
        self.gauges = {ours: series[ours].labels(*labels) for ours, _ in GAUGES}
        self.recycled = series["recycled"].labels(*labels)
        self.hist = series["request_peak"].labels(*labels)
        for key, gauge in self.gauges.items():
            gauge.set(bound if key == "max_live_blocks" else 0)  # the series exist before any step
        self.recycled.inc(0)

    def update(self, stats: dict) -> None:
        # Counter and histogram before the gauges: another process may merge the files
        # between two writes, and a scrape that shows a request gone (live 0) must
        # already count its recycled blocks and its peak.
        self.recycled.inc(max(0, stats.get("recycled_new", 0)))
        for peak in stats.get("released_peaks", ()):
            self.hist.observe(peak)
        for key, gauge in self.gauges.items():
            if key in stats:
                gauge.set(stats[key])


_series: dict | None = None


def _file_series(buckets: list[float]) -> dict:
    """The metric objects, once per process (every engine of a server has the same
    policy, so the same buckets); registry=None: vLLM serves the files, not a registry."""
    global _series
    if _series is None:
        from prometheus_client import Counter, Gauge, Histogram

        def spec(key):
            return {"name": metric_name("vllm", key), "documentation": metric_help("vllm", key),
                    "labelnames": LABELS, "registry": None}

        _series = {ours: Gauge(**spec(key), multiprocess_mode="mostrecent") for ours, key in GAUGES}
        _series["recycled"] = Counter(**spec("recycled"))
        _series["request_peak"] = Histogram(**spec("request_peak"), buckets=buckets)
    return _series


_collector: _Collector | None = None


def _the_collector() -> _Collector:
    global _collector
    if _collector is None:
        _collector = _Collector()
        REGISTRY.register(_collector)
    return _collector


class StreamingSinkStatLogger(StatLoggerBase):
    """Per-engine stat logger; does nothing when the policy is off."""

    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.engine = None
        policy = sink_config.largest_policy_of(vllm_config)  # bounds hold for every request's S
        if policy is None:
            return
        labels = [str(vllm_config.model_config.served_model_name), str(engine_index)]
        chunk = vllm_config.scheduler_config.max_num_batched_tokens
        decode = policy.max_live_blocks(sink_config.decode_step_tokens(vllm_config))  # drafts too
        if multiprocess_mode():  # several API servers
            self.engine = _FileEngine(labels, decode, policy.max_live_blocks(chunk))
            return
        self.engine = _Engine(labels, decode, policy.max_live_blocks(chunk))
        collector = _the_collector()
        with collector.lock:
            collector.engines[engine_index] = self.engine

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        stats = getattr(scheduler_stats, STATS_FIELD, None) if scheduler_stats is not None else None
        if self.engine is None or not stats:
            return
        if isinstance(self.engine, _FileEngine):  # prometheus_client locks its files itself
            self.engine.update(stats)
            return
        with _the_collector().lock:
            self.engine.update(stats)

    def log_engine_initialized(self) -> None:
        pass
