"""Prefill chunks past the window at SGLang's page size 1: one rotation per key.

The core's kernel rotates the query once per KV block, by ``delta = ws(j) - ws(jk)``.
At block size 1 every key is its own block, so a chunk of ``n`` queries needs ``n * W``
query rotations and no key can be shared between queries in a matrix product (a
7000-token prefill ran at 0.50x stock's speed; with this module 2.9x, docs/speed.md).

Here the rotation is split instead. Every window key is seen at its true distance
``t - k`` (architecture.md: the query sits at ``S + t - ws``, the key at ``S + k - ws``),
so rotating each query by ``a(t) = t - pos(t)`` and each window key by
``b(k) = k - pos(k)`` (both from where they were written, ``pos``) puts them at ``t``
and ``k``: one rotation per query and one per key, then plain matrix products over
the chunk's live keys. Sink keys keep ``delta = 0`` (seen where they were written),
so their scores use the stored query and key; they are ``S`` columns, computed apart
and joined before the softmax. Same mask as the contract (the layer's own window
included), learned sinks as one more denominator term: exactly the reference's
numbers (``tests/sglang/test_sglang_prefill.py`` checks it against
``streaming_sink.reference_attention``), in float32 like the core's kernel.

Angles come from ``streaming_sink.rope.rotate`` (float64, then float32), so their size
does not cost precision. No SGLang import.
"""

from __future__ import annotations

import torch

from streaming_sink.policy import SinkPolicy
from streaming_sink.rope import RotaryParams, rotate

# Queries per score tile: scores [Hq, TILE, TILE + W + S] float32 stay cache-sized (W = 1024:
# ~2.5 MB; 64 measured fastest of 32-512), and a tile reads only the keys its queries reach.
TILE = 64


def chunk_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor,
                    first_t: int, scale: float, policy: SinkPolicy, rope: RotaryParams, out: torch.Tensor,
                    sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """One request's queries at positions ``first_t .. first_t + n - 1`` under the contract.

    ``q``/``out``: ``[n, Hq, D]``, rotated at ``pos(t)``; ``k_buffer``/``v_buffer``:
    ``[slots, Hkv, D]``, keys rotated at ``pos(k)``, this chunk's own already written;
    ``slots``: the request's slot id per token position (its ``req_to_token`` row).
    ``sliding_window``: the layer's own window (keys with ``t - k < sliding_window``).
    """
    if policy.block_size != 1:
        raise ValueError(f"chunk_attention is the page-size-1 path; the policy's block size is {policy.block_size}")
    n, hq, d = q.shape
    hkv = k_buffer.shape[1]
    group = hq // hkv
    s_tok, w_tok = policy.sink_tokens, policy.window_tokens
    last = first_t + n  # one past the last query
    dev = q.device

    # Window keys the chunk can reach, gathered and rotated once: [lo, last).
    lo = max(s_tok, first_t - w_tok)
    if sliding_window is not None:
        lo = max(lo, first_t - sliding_window + 1)
    lo = min(lo, last)
    k_pos = torch.arange(lo, last, device=dev)
    win_slots = slots[lo:last].long()
    k_win = rotate(k_buffer[win_slots], k_pos - policy.cache_position(k_pos), rope)  # [nk, Hkv, D] f32
    v_win = v_buffer[win_slots].float()
    n_sink = min(s_tok, last)
    sink_slots = slots[:n_sink].long()
    k_sink = k_buffer[sink_slots].float()  # stored: sink keys are seen where they were written
    v_sink = v_buffer[sink_slots].float()

    t_all = torch.arange(first_t, last, device=dev)
    q_stored = q.float()
    q_true = rotate(q, t_all - policy.cache_position(t_all), rope)
    learned = None if sinks is None else sinks.float().view(hkv, group, 1, 1)

    for a in range(first_t, last, TILE):
        b = min(a + TILE, last)
        nt = b - a
        rows = slice(a - first_t, b - first_t)
        t = t_all[rows]
        k_lo = max(lo, a - w_tok) if sliding_window is None else max(lo, a - sliding_window + 1)
        cols = slice(k_lo - lo, b - lo)
        key = k_pos[cols]
        # Contract mask (reference_attention._group_batch): causal; the window
        # [t - W, t] (all of [S, t] for a dense query); a layer window instead.
        mask = key[None, :] <= t[:, None]
        sink_mask = torch.arange(n_sink, device=dev)[None, :] <= t[:, None]
        if sliding_window is None:
            mask &= key[None, :] >= (t[:, None] - w_tok)
        else:
            mask &= (t[:, None] - key[None, :]) < sliding_window
            sink_mask &= (t[:, None] - torch.arange(n_sink, device=dev)[None, :]) < sliding_window
        s_win = _scores(q_true[rows], k_win[cols], hkv, group)  # [Hkv, G, nt, nk]
        s_snk = _scores(q_stored[rows], k_sink, hkv, group)  # [Hkv, G, nt, S]
        s = torch.cat([s_snk, s_win], dim=-1).mul_(scale)
        s.masked_fill_(~torch.cat([sink_mask, mask], dim=1), float("-inf"))
        if learned is not None:  # one more denominator term per head, no value
            s = torch.cat([s, learned.expand(hkv, group, nt, 1)], dim=-1)
        p = torch.softmax(s, dim=-1)
        if learned is not None:
            p = p[..., :-1]
        v = torch.cat([v_sink, v_win[cols]], dim=0).permute(1, 0, 2)  # [Hkv, nk', D]
        o = torch.matmul(p.reshape(hkv, group * nt, -1), v)  # [Hkv, G*nt, D]
        out[rows] = o.view(hkv, group, nt, d).permute(2, 0, 1, 3).reshape(nt, hq, d).to(out.dtype)
    return out


def _scores(q: torch.Tensor, k: torch.Tensor, hkv: int, group: int) -> torch.Tensor:
    """``q`` [nt, Hq, D] against ``k`` [nk, Hkv, D] (GQA without repeat): [Hkv, G, nt, nk]."""
    nt, _, d = q.shape
    qh = q.view(nt, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * nt, d)
    s = torch.matmul(qh, k.permute(1, 2, 0))  # [Hkv, G*nt, nk]
    return s.view(hkv, group, nt, k.shape[0])
