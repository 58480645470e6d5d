"""What one SGLang process knows about the policy, in one object.

Every SGLang process loads the plugin (server/Engine, scheduler, detokenizer); only
a scheduler builds a model, so only there is ``policy`` set (by the attention backend,
before any forward) and only there do the hooks of touch points 3-7 and 9 act. With
``policy`` None (the policy off, or a process without a model) they pass through.
No SGLang import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streaming_sink.policy import SinkPolicy

from .pool import EvictionCursor


@dataclass
class SinkState:
    installed: bool = False  # hooks registered (plugin.register runs once per process)
    policy: SinkPolicy | None = None  # the policy of this scheduler's model
    # id(req.kv) -> (req.kv, its cursor): slots each running request already gave back.
    cursors: dict[int, tuple[object, EvictionCursor]] = field(default_factory=dict)
    metrics: object | None = None  # metrics.SinkMetrics with --enable-metrics

    def cursor(self, kv) -> EvictionCursor:
        """The request's cursor, made on its first step. A resumed request owns its row
        from the radix tree's prefix on (``cache_protected_len``): ``[0, h)`` is shared."""
        entry = self.cursors.get(id(kv))
        if entry is None or entry[0] is not kv:
            if entry is not None and self.metrics is not None:
                self.metrics.forget(entry[1])  # a stale entry: its id was reused
            entry = self.cursors[id(kv)] = (kv, EvictionCursor(self.policy, kv.cache_protected_len))
        return entry[1]

    def release(self, kv) -> EvictionCursor | None:
        """Drops the request's cursor at its final release; None if it never had one."""
        entry = self.cursors.pop(id(kv), None)
        if entry is not None and entry[0] is not kv:
            if self.metrics is not None:
                self.metrics.forget(entry[1])
            return None
        return None if entry is None else entry[1]

    def freed_range(self, kv) -> tuple[int, int]:
        """Row positions ``[lo, hi)`` of ``kv`` the policy already gave back (the radix
        cache inserts them as tombstones)."""
        entry = self.cursors.get(id(kv))
        if entry is None or entry[0] is not kv:
            return 0, 0
        return entry[1].start, entry[1].freed_to


state = SinkState()  # this process's
