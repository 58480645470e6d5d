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
  this step's queries (the queries are the last ``q_len`` positions).

The live blocks and the per-block query rotation come from ``SinkPolicy`` only
(no engine state), so the same code checks any engine's cache.
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """Attention for every query row of ``q``; returns ``out`` (``q``'s dtype).

    ``policy=None`` is plain causal paged attention. ``sinks`` are learned
    per-head logits added to the softmax denominator (GPT-OSS).
    ``sliding_window`` is the *layer's own* window (keys with ``t - k < sw``);
    under the policy such a layer sees no sink tokens, only its short window.
    """
    if policy is not None and rope is None:
        raise ValueError("the streaming policy needs the layer's RotaryParams")
    bs = k_cache.shape[1]
    if policy is not None and policy.block_size != bs:
        raise ValueError(f"policy block size {policy.block_size} != cache block size {bs}")
    if out is None:
        out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode = [i for i in range(len(lens)) if qsl[i + 1] - qsl[i] == 1]
    if policy is not None and len(decode) > 1:  # one batched pass: per-sequence ops cost more than the math
        rows = torch.tensor([qsl[i] for i in decode], device=q.device)
        out[rows] = _decode_batch(q[rows], torch.tensor([lens[i] - 1 for i in decode], device=q.device),
                                  k_cache, v_cache, block_table[decode], scale, policy, rope, sinks,
                                  sliding_window).to(out.dtype)
    else:
        decode = []
    for i in range(len(lens)):
        q_lo, q_hi = qsl[i], qsl[i + 1]
        if q_hi == q_lo or i in decode:
            continue
        first_t = lens[i] - (q_hi - q_lo)
        t_all = torch.arange(first_t, lens[i], device=q.device)
        # Queries of one block share their live blocks and rotations.
        for j in range(first_t // bs, (lens[i] - 1) // bs + 1):
            sel = (t_all // bs) == j
            rows = torch.nonzero(sel).flatten() + q_lo
            out[rows] = _block_group(
                q[rows], t_all[sel], j, k_cache, v_cache, block_table[i], scale,
                policy, rope, sinks, sliding_window).to(out.dtype)
    return out


def _block_group(q, t, j, k_cache, v_cache, table, scale, policy, rope, sinks, sliding_window):
    """Queries ``q`` [Q, Hq, D] at positions ``t``, all in logical block ``j``."""
    bs = k_cache.shape[1]
    streaming = policy is not None and policy.is_streaming(j)
    if policy is None:
        blocks = list(range(j + 1))
    else:
        blocks = policy.live_blocks(j)
    if sliding_window is not None:  # only the blocks the layer's own window reaches
        lo = max(int(t[0]) - sliding_window + 1, 0) // bs
        blocks = [b for b in blocks if b >= lo]
    if streaming and sliding_window is not None:
        blocks = [b for b in blocks if b >= policy.sink_blocks]
    blk = torch.tensor(blocks, device=q.device)
    phys = table[blk].long()
    k = k_cache[phys].float()  # [nb, bs, Hkv, D]
    v = v_cache[phys].float()
    group = q.shape[1] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)

    if streaming:
        delta = policy.query_delta(j, blk)
        delta = torch.where(blk < policy.sink_blocks, torch.zeros_like(delta), delta)
        qb = rotate(q[None], delta[:, None], rope)  # [nb, Q, Hq, D]
        s = torch.einsum("bqhd,bkhd->qhbk", qb, k)
    else:
        s = torch.einsum("qhd,bkhd->qhbk", q.float(), k)
    s = s.flatten(2) * scale  # [Q, Hq, nb*bs]

    key = (blk[:, None] * bs + torch.arange(bs, device=q.device)).flatten()  # absolute positions
    tq = t[:, None]
    mask = key[None, :] <= tq
    if streaming and sliding_window is None:
        mask &= (key[None, :] < policy.sink_tokens) | (key[None, :] >= policy.window_start(j))
    if sliding_window is not None:
        mask &= (tq - key[None, :]) < sliding_window
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    if sinks is not None:  # a learned logit per head: one more denominator term, no value
        sink_col = sinks.float().view(1, -1, 1).expand(s.shape[0], -1, 1)
        s = torch.cat([s, sink_col], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    # Slots no query attends (a block's unwritten tail) may hold anything, NaN
    # included: 0 * NaN would leak into the output, so drop them from v.
    v = torch.where(mask.any(0)[:, None, None], v.flatten(0, 1), 0.0)
    return torch.einsum("qhn,nhd->qhd", p, v)


def _decode_batch(q, t, k_cache, v_cache, tables, scale, policy, rope, sinks, sliding_window):
    """One query per sequence (``q`` [B, Hq, D] at positions ``t`` [B]), batched: the
    same rules as ``_block_group``, over ``Sb + Wb + 1`` block columns per sequence
    (a dense sequence's unused columns point at block 0 and are masked)."""
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    B, hq, d = q.shape
    j = t // bs
    streaming = policy.is_streaming(j)  # [B]
    col = torch.arange(policy.dense_blocks, device=q.device)
    win = j[:, None] - policy.window_blocks + (col[None, :] - policy.sink_blocks)
    blk = torch.where(streaming[:, None] & (col[None, :] >= policy.sink_blocks), win, col[None, :])
    used = blk <= j[:, None]  # [B, nb]; a layer's own window is a token mask below
    blk = torch.where(used, blk, 0)
    phys = torch.gather(tables.long(), 1, blk)
    k = k_cache[phys].float()  # [B, nb, bs, Hkv, D]
    v = v_cache[phys].float()

    delta = torch.where(blk < policy.sink_blocks, 0, policy.query_delta(j[:, None], blk))  # 0 when dense
    qb = rotate(q[:, None].expand(B, blk.shape[1], hq, d), delta, rope)  # [B, nb, Hq, D]
    qb = qb.view(B, blk.shape[1], hkv, hq // hkv, d)
    s = torch.einsum("bnhgd,bnkhd->bhgnk", qb, k).reshape(B, hq, -1) * scale  # [B, Hq, nb*bs]

    key = (blk[:, :, None] * bs + torch.arange(bs, device=q.device)).flatten(1)  # [B, nb*bs]
    tq = t[:, None]
    mask = used.repeat_interleave(bs, dim=1) & (key <= tq)
    if sliding_window is None:
        mask &= ~streaming[:, None] | (key < policy.sink_tokens) | (key >= policy.window_start(j)[:, None])
    else:
        mask &= (tq - key) < sliding_window
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    if sinks is not None:  # a learned logit per head: one more denominator term, no value
        s = torch.cat([s, sinks.float().view(1, -1, 1).expand(B, -1, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    v = torch.where(mask[:, :, None, None], v.flatten(1, 2), 0.0)  # unread slots may hold NaN
    o = torch.einsum("bhgn,bnhd->bhgd", p.view(B, hkv, hq // hkv, -1), v)
    return o.reshape(B, hq, d)
