"""The dense/streaming split of one engine step, on torch tensors (any device).

A sequence whose length is at most ``policy.dense_tokens`` has every query in the
dense regime (``t < S + W`` rounded to blocks: keys at their natural positions), so
the engine's own attention kernel computes exactly the contract for it, at stock
speed; only the other sequences need the policy's kernel. An adapter splits each
step once (in its metadata builder) and runs one kernel call per side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def dense_sequences(policy, seq_lens: torch.Tensor, sink_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask: sequences whose every query is in the dense regime (``sink_tokens``:
    each sequence's own ``S``, which moves its dense bound; None: the policy's)."""
    if sink_tokens is None:
        return seq_lens <= policy.dense_tokens
    return seq_lens <= policy.dense_tokens_of(sink_tokens)


def query_rows(query_start_loc: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query rows of sequences ``ids`` in a varlen batch (int64), and the
    ``query_start_loc`` of those sequences alone (int64): how an adapter hands a
    subset of a step to another kernel. Vectorised: no per-sequence Python loop."""
    qsl = query_start_loc.long()
    ids = ids.long()
    starts = qsl[ids]
    lens = qsl[ids + 1] - starts
    sub = torch.zeros(len(ids) + 1, dtype=torch.long, device=qsl.device)
    sub[1:] = lens.cumsum(0)
    # Row i of the subset is start[seq] + (i - sub[seq]).
    offset = torch.repeat_interleave(starts - sub[:-1], lens)
    rows = torch.arange(offset.numel(), dtype=torch.long, device=qsl.device) + offset
    return rows, sub


@dataclass(frozen=True)
class StepSplit:
    """One step's sequences by regime. ``None`` fields: that side is empty, or (for
    ``dense_ids`` / ``dense_rows``) the whole batch, so the engine's kernel takes the
    step's own metadata unchanged."""

    dense_ids: torch.Tensor | None  # dense sequences (None: all or none of them)
    dense_rows: torch.Tensor | None  # their query rows
    dense_query_start_loc: torch.Tensor | None  # their query offsets, as a batch of their own
    streaming_ids: torch.Tensor | None  # sequences for the policy's kernel (None: none)
    all_dense: bool

    @property
    def any_dense(self) -> bool:
        return self.all_dense or self.dense_ids is not None


def split_step(policy, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
               max_seq_len: int | None = None, sink_tokens: torch.Tensor | None = None,
               min_sink_tokens: int | None = None) -> StepSplit:
    """Splits a step (``seq_lens`` per sequence, ``query_start_loc`` its varlen query
    offsets) by regime. ``max_seq_len``: a host-side upper bound of ``seq_lens``, when
    the engine has one: a step below the window is then decided without reading the
    device tensor. ``sink_tokens``: each sequence's own ``S`` (per-request sinks;
    None: the policy's), ``min_sink_tokens`` a host-side lower bound of it (the
    smallest ``S`` has the lowest dense bound)."""
    lowest = policy.sink_tokens if sink_tokens is None else min_sink_tokens
    if max_seq_len is not None and lowest is not None and max_seq_len <= policy.dense_tokens_of(lowest):
        return StepSplit(None, None, None, None, all_dense=True)
    dense = dense_sequences(policy, seq_lens, sink_tokens)
    n_dense = int(dense.sum())
    if n_dense == len(seq_lens):
        return StepSplit(None, None, None, None, all_dense=True)
    streaming = torch.nonzero(~dense).flatten()
    if n_dense == 0:
        return StepSplit(None, None, None, streaming, all_dense=False)
    ids = torch.nonzero(dense).flatten()
    rows, sub = query_rows(query_start_loc, ids)
    return StepSplit(ids, rows, sub, streaming, all_dense=False)
