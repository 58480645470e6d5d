"""Which token slots of a request's row go back to SGLang's allocator, and when.

SGLang keeps one row of slot ids per request (``req_to_token``); the policy's
block size is SGLang's page size, so logical block ``b`` is row positions
``[b*bs, (b+1)*bs)``. Freed slots stay in the row as stale ids (attention never
reads them: it derives live blocks from the policy), so the final release of
the row must skip them. A request that resumed after a cached prefix of ``h``
tokens owns its row from ``h`` on only (the radix tree owns ``[0, h)``, shared):
it frees its own slots, never the tree's. All rules come from ``SinkPolicy``; no
SGLang import.
"""

from __future__ import annotations

from streaming_sink.policy import SinkPolicy


class EvictionCursor:
    """Per request: row positions ``[start, freed_to)`` are back in the pool, where
    ``start = max(sink_end, protected)`` (``protected``: the tree-owned prefix).
    ``policy``: the request's own (its sink length ``S``, state.SinkState.policy_for)."""

    __slots__ = ("policy", "sink_end", "protected", "start", "freed_to")

    def __init__(self, policy: SinkPolicy, protected: int = 0) -> None:
        self.policy = policy
        self.sink_end = policy.sink_blocks * policy.block_size
        self.protected = protected
        self.start = self.freed_to = max(self.sink_end, protected)

    def advance(self, tokens_in_cache: int) -> tuple[int, int] | None:
        """The row range that no later query reads once ``tokens_in_cache`` tokens
        are written (None if nothing new); the caller frees it."""
        blocks = self.policy.freeable_prefix_blocks(tokens_in_cache)
        hi = blocks.stop * self.policy.block_size
        if hi <= self.freed_to:
            return None
        lo, self.freed_to = self.freed_to, hi
        return lo, hi

    @property
    def freed(self) -> int:
        return self.freed_to - self.start

    def held(self, allocated: int) -> int:
        """Slots of its own the request holds, of a row allocated to ``allocated``."""
        return allocated - self.protected - self.freed

    def live_ranges(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``ranges`` (ascending, half-open row positions) minus what was already freed."""
        out = []
        for lo, hi in ranges:
            for a, b in ((lo, min(hi, self.start)), (max(lo, self.freed_to), hi)):
                if a < b:
                    out.append((a, b))
        return out
