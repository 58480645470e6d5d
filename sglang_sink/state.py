"""What one SGLang process knows about the policy, in one object.

Every SGLang process loads the plugin (server/Engine, scheduler, detokenizer); only
a scheduler builds a model, so only there is ``policy`` set (by the attention backend,
before any forward) and only there do the hooks of touch points 3-7 and 9 act. With
``policy`` None (the policy off, or a process without a model) they pass through.

Per-request sinks (docs/sglang.md): ``policy`` is the server's, with the default ``S``
(``--sink-tokens``); a request may carry its own ``S`` (``custom_params["sink_tokens"]``,
checked by the front end, frontend.py), and every rule for it comes from
``policy_for(S)``: the server's window and page size with that ``S``.
No SGLang import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streaming_sink.policy import SinkPolicy
from streaming_sink.request_sinks import FIELD

from .pool import EvictionCursor


@dataclass
class SinkState:
    installed: bool = False  # hooks registered (plugin.register runs once per process)
    policy: SinkPolicy | None = None  # the policy of this scheduler's model
    # id(req.kv) -> (req.kv, its cursor): slots each running request already gave back.
    cursors: dict[int, tuple[object, EvictionCursor]] = field(default_factory=dict)
    metrics: object | None = None  # metrics.SinkMetrics with --enable-metrics
    max_sink_tokens: int = 0  # the largest S a request may carry (--max-sink-tokens, or the default S)
    admitting: object | None = None  # the request PrefillAdder.add_one_req is admitting (admission.py)
    # The next forward's per-request S (backend.remap_positions -> the backend's
    # init_forward_metadata, in that order, one step at a time: the overlap schedule is off):
    # (requests, int64 tensor in batch order), or None when all have the server's S.
    step_sinks: tuple[int, object] | None = None
    _policies: dict[tuple[SinkPolicy, int], SinkPolicy] = field(default_factory=dict)

    def policy_for(self, sink_tokens: int) -> SinkPolicy:
        """The server's policy with a request's own ``S`` (one object per ``S``)."""
        key = (self.policy, sink_tokens)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = self.policy.with_sinks(sink_tokens)
        return policy

    def sink_tokens_of(self, req) -> int:
        """A request's ``S``: its ``custom_params["sink_tokens"]`` (the front end checked
        and normalised it to an int), else the server's."""
        params = req.sampling_params.custom_params
        value = params.get(FIELD) if isinstance(params, dict) else None
        return self.policy.sink_tokens if value is None else int(value)

    def policy_of(self, req) -> SinkPolicy:
        return self.policy_for(self.sink_tokens_of(req))

    def take_step_sinks(self, seq_lens):
        """The per-request S of the step being run (None: the server's for all); taken once."""
        entry, self.step_sinks = self.step_sinks, None
        if entry is None:
            return None
        if entry[0] != len(seq_lens):
            raise RuntimeError(f"streaming-sink: a step of {len(seq_lens)} sequences, sink lengths for {entry[0]}")
        return entry[1]

    def cursor(self, kv, policy: SinkPolicy) -> EvictionCursor:
        """The request's cursor (``policy``: its own), made on its first step. A resumed
        request owns its row from the radix tree's prefix on (``cache_protected_len``):
        ``[0, h)`` is shared."""
        entry = self.cursors.get(id(kv))
        if entry is None or entry[0] is not kv:
            if entry is not None and self.metrics is not None:
                self.metrics.forget(entry[1])  # a stale entry: its id was reused
            entry = self.cursors[id(kv)] = (kv, EvictionCursor(policy, kv.cache_protected_len))
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
