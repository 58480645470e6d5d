"""Touch point 7: the policy's numbers travel with the scheduler's stats.

``Scheduler.make_stats`` (engine core) adds the policy managers' numbers to the
``SchedulerStats`` it sends the front end, in one extra dataclass field ``streaming_sink``
added to ``SchedulerStats`` in every process (vLLM's msgpack encoder and decoder take a
dataclass's fields and type hints). The front end's side is a stat logger plugin (metrics.py).
"""

from __future__ import annotations

import functools

from .. import config as sink_config

STATS_FIELD = "streaming_sink"


def install() -> None:
    import dataclasses
    import typing

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.stats import SchedulerStats

    if STATS_FIELD not in SchedulerStats.__dataclass_fields__:
        @dataclasses.dataclass
        class _Carrier:  # a real dataclasses.Field, made the public way
            streaming_sink: dict[str, typing.Any] | None = None

        SchedulerStats.__dataclass_fields__[STATS_FIELD] = dataclasses.fields(_Carrier)[0]
        SchedulerStats.__annotations__[STATS_FIELD] = dict[str, typing.Any] | None
        setattr(SchedulerStats, STATS_FIELD, None)
    original = Scheduler.make_stats

    @functools.wraps(original)
    def make_stats(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if stats is not None:
            managers = _sink_managers(self)
            if managers:
                setattr(stats, STATS_FIELD, _policy_stats(
                    managers, sink_config.decode_step_tokens(self.vllm_config)))
        return stats

    Scheduler.make_stats = make_stats


def _sink_managers(scheduler) -> list:
    from ..kv_manager import StreamingSinkManager

    coordinator = getattr(scheduler.kv_cache_manager, "coordinator", None)
    return [m for m in getattr(coordinator, "single_type_managers", ())
            if isinstance(m, StreamingSinkManager)]


def _policy_stats(managers, step_tokens: int = 1) -> dict:
    """Summed over the policy's KV cache groups (one, or GPT-OSS's full layers).
    ``step_tokens``: what one decode step writes per request (drafts included)."""
    total: dict = {}
    peaks: dict[str, int] = {}
    for manager in managers:
        for key, value in manager.policy_stats().items():
            total[key] = total.get(key, 0) + value
        while manager.released_peaks:
            request_id, peak = manager.released_peaks.popitem(last=False)
            peaks[request_id] = peaks.get(request_id, 0) + peak
    total["released_peaks"] = list(peaks.values())
    # the bound of the widest request (S at --max-sink-tokens): every request stays within it
    total["max_live_blocks"] = sum(m.largest_policy.max_live_blocks(step_tokens) for m in managers)
    # Recycled since the last stats: each SchedulerStats reaches one front end only, so
    # with several API servers (metrics.py, multiprocess mode) their sum is the total.
    total["recycled_new"] = 0
    for manager in managers:
        total["recycled_new"] += manager.recycled_blocks - getattr(manager, "_recycled_reported", 0)
        manager._recycled_reported = manager.recycled_blocks
    return total
