"""The policy's Prometheus metrics: one name and one meaning per quantity, for every engine.

A name is ``<engine>:streaming_sink_<name>``, with the engine's KV unit in it where the
engines count differently: vLLM counts **blocks** (``--block-size`` tokens each), SGLang
**tokens** (its KV slots at page size 1, the only one the policy runs). Same quantity,
same meaning, same name apart from the unit word: a dashboard switches engines by
prefix and unit. Counters are exposed with Prometheus' ``_total`` suffix, histograms
with ``_bucket`` / ``_count`` / ``_sum``.

Engine-free: names and help text only; each adapter builds its series with its
engine's metric classes and labels.
"""

from __future__ import annotations

from dataclasses import dataclass

UNITS = {"vllm": "block", "sglang": "token"}
PREFIX = "streaming_sink_"


@dataclass(frozen=True)
class Metric:
    key: str  # what the adapters call it
    kind: str  # "gauge", "counter" or "histogram"
    name: str  # after "<engine>:streaming_sink_"; "{unit}" is the engine's unit
    help: str  # "{unit}" as above; "{units}" its plural


METRICS = (
    Metric("requests_past_window", "gauge", "requests_past_window",
           "Requests whose sliding window has moved past the sink tokens (more than sinks + "
           "window in the cache): they hold the sinks and the window only, the rest is recycled."),
    Metric("sinks_pinned", "gauge", "sink_{unit}s_pinned",
           "KV {units} pinned as attention sinks by the requests holding KV "
           "(vLLM: ceil(S / block_size) blocks each; SGLang: min(S, tokens in cache) each)."),
    Metric("live", "gauge", "live_{unit}s",
           "KV {units} held by requests under the streaming-sink policy."),
    Metric("max_live", "gauge", "max_live_{unit}s",
           "The policy's bound on the KV {units} one decoding request holds "
           "(sinks + window + the current block)."),
    Metric("recycled", "counter", "recycled_{unit}s",
           "KV {units} the sliding window left behind (the gap between sinks and window), "
           "returned to the engine's free pool."),
    Metric("request_peak", "histogram", "request_live_{unit}s",
           "Per request, the most KV {units} of its own it held at once (sinks + window + the "
           "step's new tokens), observed when it releases its KV (finished, aborted, preempted)."),
)
_BY_KEY = {m.key: m for m in METRICS}


def metric_name(engine: str, key: str) -> str:
    """The exposed name (counters without ``_total``), e.g. ``vllm:streaming_sink_live_blocks``."""
    return f"{engine}:{PREFIX}{_BY_KEY[key].name.format(unit=UNITS[engine])}"


def metric_help(engine: str, key: str) -> str:
    unit = UNITS[engine]
    return _BY_KEY[key].help.format(unit=unit, units=unit + "s")


def exposed_names(engine: str, keys=None) -> set[str]:
    """Every series name Prometheus shows for ``keys`` (default: all)."""
    names = set()
    for m in METRICS if keys is None else (_BY_KEY[k] for k in keys):
        base = metric_name(engine, m.key)
        names |= {"counter": {base + "_total"}, "gauge": {base},
                  "histogram": {base + "_bucket", base + "_count", base + "_sum"}}[m.kind]
    return names
