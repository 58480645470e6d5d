"""Torch reference attention over a paged KV cache, computing the contract.

This is what the CPU backend runs and what the Triton kernels are checked
against. Layout (vLLM's FlashAttention/Triton layout):

* ``q``: ``[num_tokens, Hq, D]``, rotated at cache positions ``pos(t)``;
* ``k_cache``/``v_cache``: ``[num_blocks, block_size, Hkv, D]``, keys rotated at
  the cache position they were written at;
* ``block_table``: ``[num_seqs, max_blocks]`` physical ids per logical block.
  Ids outside the live blocks may be stale (freed and reused): never read them;
* ``query_start_loc``: ``[num_seqs + 1]``, varlen offsets into ``q``;
* ``seq_lens``: ``[num_seqs]``, tokens in the cache per sequence *including*
  this step's queries (the queries are the last ``q_len`` positions);
* ``sink_tokens``: ``[num_seqs]`` (optional), each sequence's own ``S``: the
  contract with that ``S`` (its ``Sb``, dense regime, ``ws``, positions); the
  policy gives the window and block size. ``max_sink_tokens`` bounds it (host int,
  for sizing without a device sync). None: ``policy.sink_tokens`` for all;
* ``k_scale``/``v_scale``: float or 1-element tensor; the caches may then be fp8
  (``float8_e4m3fn``/``float8_e5m2``), read as ``k = k_fp8.float() * k_scale``.

The live blocks and the per-block query rotation come from ``SinkPolicy`` only
(no engine state), so the same code checks any engine's cache.
"""

from __future__ import annotations

import dataclasses

import torch

from .policy import SinkPolicy
from .rope import RotaryParams, rotate


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    policy: SinkPolicy | None = None,
    rope: RotaryParams | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    sink_tokens: torch.Tensor | None = None,
    max_sink_tokens: int | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for every query row of ``q``; returns ``out`` (``q``'s dtype).

    ``policy=None`` is plain causal paged attention. ``sinks`` are learned
    per-head logits added to the softmax denominator (GPT-OSS).
    ``sliding_window`` is the *layer's own* window (keys with ``t - k < sw``);
    under the policy such a layer sees no sink tokens, only its short window.
    ``sink_tokens`` / ``max_sink_tokens`` / ``k_scale`` / ``v_scale``: module docstring.
    """
    check_args(k_cache, policy, rope, sink_tokens, max_sink_tokens)
    bs = k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    kv_scales = (cache_scale(k_cache, k_scale), cache_scale(v_cache, v_scale))
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    if policy is not None:
        if sink_tokens is None:
            return _policy_attention(q, k_cache, v_cache, block_table, qsl, lens, scale, policy, rope, sinks,
                                     sliding_window, out, range(len(lens)), kv_scales)
        per_seq = sink_tokens.tolist()
        bound = policy.sink_tokens if max_sink_tokens is None else max_sink_tokens
        if not all(0 <= s <= bound for s in per_seq):
            raise ValueError(f"sink_tokens {per_seq} outside [0, max_sink_tokens={bound}]")
        for S in sorted(set(per_seq)):  # the sequences sharing one S follow the contract with that S
            seqs = [i for i, s in enumerate(per_seq) if s == S]
            _policy_attention(q, k_cache, v_cache, block_table, qsl, lens, scale,
                              dataclasses.replace(policy, sink_tokens=S), rope, sinks, sliding_window, out, seqs,
                              kv_scales)
        return out
    for i in range(len(lens)):
        q_lo, q_hi = qsl[i], qsl[i + 1]
        if q_hi == q_lo:
            continue
        first_t = lens[i] - (q_hi - q_lo)
        t_all = torch.arange(first_t, lens[i], device=q.device)
        for j in range(first_t // bs, (lens[i] - 1) // bs + 1):
            sel = (t_all // bs) == j
            rows = torch.nonzero(sel).flatten() + q_lo
            out[rows] = _block_group(q[rows], t_all[sel], j, k_cache, v_cache, block_table[i], scale,
                                     sinks, sliding_window, kv_scales).to(out.dtype)
    return out


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def check_args(k_cache: torch.Tensor, policy: SinkPolicy | None, rope: RotaryParams | None,
               sink_tokens: torch.Tensor | None = None, max_sink_tokens: int | None = None) -> None:
    """What every implementation of this API (reference, CPU kernel, Triton) refuses
    (host metadata only: no device sync)."""
    if policy is not None and rope is None:
        raise ValueError("the streaming policy needs the layer's RotaryParams")
    if policy is not None and policy.block_size != k_cache.shape[1]:
        raise ValueError(f"policy block size {policy.block_size} != cache block size {k_cache.shape[1]}")
    if sink_tokens is not None:
        if policy is None:
            raise ValueError("sink_tokens needs a policy (it is the policy's per-sequence S)")
        if sink_tokens.dtype not in (torch.int32, torch.int64) or sink_tokens.dim() != 1:
            raise ValueError(f"sink_tokens must be a 1-D int32/int64 tensor, got {sink_tokens.dtype} "
                             f"{tuple(sink_tokens.shape)}")
    if max_sink_tokens is not None and max_sink_tokens < 0:
        raise ValueError(f"max_sink_tokens must be >= 0, got {max_sink_tokens}")


def cache_scale(cache: torch.Tensor, scale: float | torch.Tensor | None) -> float:
    """The factor a cache's values are read with: ``scale`` for an fp8 cache; any other
    cache is read as stored, so its scale must be 1 (vLLM's default)."""
    value = 1.0 if scale is None else scale_value(scale)
    if value != 1.0 and cache.dtype not in FP8_DTYPES:
        raise ValueError(f"k_scale/v_scale {value} given for a {cache.dtype} cache (only fp8 caches are scaled)")
    return value


def _read(cache: torch.Tensor, phys: torch.Tensor, scale: float) -> torch.Tensor:
    """Blocks ``phys`` of a cache as float32, dequantized (``x.float() * scale``)."""
    x = cache[phys].float()
    return x if scale == 1.0 else x * scale


def scale_value(scale: float | torch.Tensor) -> float:
    """A k/v scale as a host float (a host sync for a device tensor: reference only)."""
    return float(scale.reshape(-1)[0]) if isinstance(scale, torch.Tensor) else float(scale)


def _block_group(q, t, j, k_cache, v_cache, table, scale, sinks, sliding_window, kv_scales):
    """Plain causal paged attention (no policy) for queries ``q`` [Q, Hq, D] at positions
    ``t``, all in logical block ``j``: every block ``0..j`` (the layer's own window aside)."""
    bs = k_cache.shape[1]
    blocks = list(range(j + 1))
    if sliding_window is not None:  # only the blocks the layer's own window reaches
        lo = max(int(t[0]) - sliding_window + 1, 0) // bs
        blocks = [b for b in blocks if b >= lo]
    blk = torch.tensor(blocks, device=q.device)
    phys = table[blk].long()
    k = _read(k_cache, phys, kv_scales[0])  # [nb, bs, Hkv, D]
    v = _read(v_cache, phys, kv_scales[1])
    group = q.shape[1] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("qhd,bkhd->qhbk", q.float(), k).flatten(2) * scale  # [Q, Hq, nb*bs]
    key = (blk[:, None] * bs + torch.arange(bs, device=q.device)).flatten()  # absolute positions
    tq = t[:, None]
    mask = key[None, :] <= tq
    if sliding_window is not None:
        mask &= (tq - key[None, :]) < sliding_window
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    if sinks is not None:  # a learned logit per head: one more denominator term, no value
        s = torch.cat([s, sinks.float().view(1, -1, 1).expand(s.shape[0], -1, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    # Slots no query attends (a block's unwritten tail) may hold anything, NaN
    # included: 0 * NaN would leak into the output, so drop them from v.
    v = torch.where(mask.any(0)[:, None, None], v.flatten(0, 1), 0.0)
    return torch.einsum("qhn,nhd->qhd", p, v)


# Elements of the largest per-pass intermediate (the rotated queries / the scores):
# decode rows (small groups) go many per pass; prefill groups one at a time, which
# keeps the intermediates cache-sized (32 groups per pass ran prefill 2x slower).
_PASS_ELEMENTS = 1 << 20


def _policy_attention(q, k_cache, v_cache, block_table, qsl, lens, scale, policy, rope, sinks,
                      sliding_window, out, seqs, kv_scales):
    """The contract for sequences ``seqs``, batched: queries are grouped by (sequence,
    logical block) -- a group shares its live blocks and per-block rotations -- and
    groups go through ``_group_batch`` many at a time."""
    bs, hq, d = k_cache.shape[1], q.shape[1], q.shape[2]
    groups = []  # (sequence, block j, first q row, first position, queries)
    for i in seqs:
        q_lo, q_hi = qsl[i], qsl[i + 1]
        first_t = lens[i] - (q_hi - q_lo)
        for j in range(first_t // bs, (lens[i] - 1) // bs + 1) if q_hi > q_lo else ():
            t0, t1 = max(first_t, j * bs), min(lens[i], (j + 1) * bs)
            groups.append((i, j, q_lo + t0 - first_t, t0, t1 - t0))
    if not groups:
        return out
    qmax = max(g[4] for g in groups)
    per_group = policy.dense_blocks * qmax * hq * max(d, bs)
    step = max(1, _PASS_ELEMENTS // per_group)
    off = torch.arange(qmax, device=q.device)
    for g0 in range(0, len(groups), step):
        seq, j, row0, t0, n = (torch.tensor(x, device=q.device) for x in zip(*groups[g0:g0 + step]))
        valid = off[None, :] < n[:, None]
        off_g = torch.minimum(off[None, :], n[:, None] - 1)  # padding repeats a group's last query
        rows = row0[:, None] + off_g
        o = _group_batch(q[rows], t0[:, None] + off_g, j, k_cache, v_cache, block_table[seq], scale,
                         policy, rope, sinks, sliding_window, kv_scales)
        out[rows[valid]] = o[valid].to(out.dtype)
    return out


def _group_batch(q, t, j, k_cache, v_cache, tables, scale, policy, rope, sinks, sliding_window, kv_scales):
    """Groups of queries, ``q`` [G, Q, Hq, D] at positions ``t`` [G, Q], group ``g`` all in
    logical block ``j[g]`` of the sequence whose block table is ``tables[g]``. Each group
    reads ``Sb + Wb + 1`` block columns: its live blocks (a dense group's unused columns
    point at block 0 and are masked), each seen through the query rotated by its delta."""
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    G, Q, hq, d = q.shape
    streaming = policy.is_streaming(j)  # [G]
    col = torch.arange(policy.dense_blocks, device=q.device)
    win = j[:, None] - policy.window_blocks + (col[None, :] - policy.sink_blocks)
    blk = torch.where(streaming[:, None] & (col[None, :] >= policy.sink_blocks), win, col[None, :])
    used = blk <= j[:, None]  # [G, nb]; a layer's own window is a token mask below
    blk = torch.where(used, blk, 0)
    nb = blk.shape[1]
    phys = torch.gather(tables.long(), 1, blk)
    k = _read(k_cache, phys, kv_scales[0])  # [G, nb, bs, Hkv, D]
    v = _read(v_cache, phys, kv_scales[1])

    delta = torch.where(blk < policy.sink_blocks, 0, policy.query_delta(j[:, None], blk))  # 0 when dense
    qb = rotate(q[:, None].expand(G, nb, Q, hq, d), delta[:, :, None], rope)  # [G, nb, Q, Hq, D]
    qb = qb.view(G, nb, Q, hkv, hq // hkv, d)
    s = torch.einsum("bnqhgd,bnkhd->bqhgnk", qb, k).reshape(G, Q, hq, nb * bs) * scale

    key = (blk[:, :, None] * bs + torch.arange(bs, device=q.device)).flatten(1)[:, None, :]  # [G, 1, nb*bs]
    tq = t[:, :, None]
    mask = used.repeat_interleave(bs, dim=1)[:, None, :] & (key <= tq)  # [G, Q, nb*bs]
    if sliding_window is None:
        mask &= ~streaming[:, None, None] | (key < policy.sink_tokens) | (key >= policy.window_start(j)[:, None, None])
    else:
        mask &= (tq - key) < sliding_window
    s = s.masked_fill(~mask[:, :, None, :], float("-inf"))
    if sinks is not None:  # a learned logit per head: one more denominator term, no value
        s = torch.cat([s, sinks.float().view(1, 1, -1, 1).expand(G, Q, -1, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    # Slots no query of the group attends (a block's unwritten tail, a masked column)
    # may hold anything, NaN included: 0 * NaN would leak into the output.
    v = torch.where(mask.any(1)[:, :, None, None], v.flatten(1, 2), 0.0)  # [G, nb*bs, Hkv, D]
    o = torch.einsum("bqhgn,bnhd->bqhgd", p.view(G, Q, hkv, hq // hkv, -1), v)
    return o.reshape(G, Q, hq, d)


def attended_keys(policy: SinkPolicy | None, bs: int, seq_len: int, q_len: int,
                  sliding_window: int | None) -> torch.Tensor:
    """Bool [seq_len]: the keys some query of a step attends (the last ``q_len`` of
    ``seq_len`` tokens), by the contract: what a kernel may read, all else it must not."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    first = seq_len - q_len
    for j in range(first // bs, (seq_len - 1) // bs + 1) if q_len else ():
        t_min, t_max = max(first, j * bs), min(seq_len, (j + 1) * bs) - 1
        streaming = policy is not None and policy.is_streaming(j)
        lo = policy.window_start(j) if streaming else 0
        if sliding_window is not None:
            lo = max(lo, t_min - sliding_window + 1)
        elif streaming:
            mask[: policy.sink_tokens] = True
        mask[max(lo, 0): t_max + 1] = True
    return mask
