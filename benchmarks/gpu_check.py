#!/usr/bin/env python
"""The device check: streaming-sink's Triton kernel on a GPU, in one command.

    python benchmarks/gpu_check.py                 # full check (estimated 3-5 min on an H100/H200;
                                                   # new timing points stop at --budget-s 420)
    python benchmarks/gpu_check.py --quick         # smaller timing grid, fewer reps (estimated 2-3 min)
    python benchmarks/gpu_check.py --interpret     # CPU, Triton interpreter, tiny shapes, correctness only

Needs only torch, triton and this repository (no vLLM, no network, no pip install):
the repository root is put on ``sys.path``. Prints a table and writes JSON
(``--out``; default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``./gpu_check.json``).

Sections (docs/gpu.md says how to read them):

1. **correctness** -- ``triton_attention.paged_attention`` against the torch reference
   ``reference_attention.paged_attention_ref`` (fp32 math) on the *same* cache tensors:
   decode batches 1/64/256, prefill chunks 512/2048, head_dim 64/128, GQA 8:1, bf16 / fp16
   (and fp32) caches, learned sinks, layer windows, stale block ids in the freed gap (ids of
   NaN blocks and of other sequences' blocks), mixed dense/streaming rows in one batch, the
   plain (policy off) path, split KV, the HND cache order and a strided q, fp8 caches (e4m3 / e5m2
   with k/v scale tensors; the reference reads the same bytes dequantized), an e4m3 query with its
   scale (what vLLM's layer hands TRITON_ATTN / FA3 with an fp8 cache), per-sequence sink
   lengths (S = 0, not a multiple of the block, larger than the window, the default, in one batch). Every query row is checked on its own: its largest
   error against a tolerance built from the cache dtype's rounding (``row_tolerance``).
2. **decode bandwidth** -- live K/V bytes the kernel must read, per second, as a share of a
   device-to-device copy measured in the same run; live 1k-128k tokens x batch 1-256.
3. **prefill** -- the kernel vs ``scaled_dot_product_attention`` (flash backend) over the
   same number of keys per query: time and TFLOP/s.
4. **cost follows live KV** -- a 4k window at stream position ~4k vs ~128k.

Goals (printed PASS/MISS; they do not change the exit code): decode >= 80% of the copy
bandwidth at live >= 8k and batch >= 32; prefill <= 1.3x SDPA-flash time over equal keys;
bf16 rows within bf16 rounding per row; position 128k within 10% of position 4k.
Exit code: 0 iff every correctness row passed (2: could not run at all).
"""

from __future__ import annotations

import os
import sys

# The interpreter must be chosen before triton is first imported (torch does not import it).
if "--interpret" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

T0 = time.monotonic()

# One unit in the last place, relative (2^-(mantissa bits)): twice the round-to-nearest
# unit roundoff, so it also covers the interpreter's round-toward-zero bf16 conversion.
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10,
       # fp32: the kernel and the reference sum up to ~10^4 terms in different orders
       # (and build sin/cos differently): 2^-17 ~ 64 fp32 ulps.
       torch.float32: 2.0 ** -17}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Every kind of correctness row the check must contain (tests/test_gpu_check.py asserts it).
REQUIRED_KINDS = ("decode", "prefill", "bf16", "fp16", "head_dim_64", "head_dim_128", "gqa_8to1",
                  "learned_sinks", "layer_window", "stale_gap", "mixed", "policy_off", "split_kv",
                  "fp8_e4m3", "fp8_e5m2", "per_seq_sinks", "fp8_query")
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# fp8 rows: x / scale is stored; |x| <= ~5 (normal draws) stays far inside e4m3's 448.
FP8_SCALES = (0.05, 0.085)
# fp8-query rows: q / Q_SCALE stored as e4m3 (|q| <= ~5 -> <= 250, inside 448), as vLLM's layer
# quantizes the query for TRITON_ATTN / FA3 with an e4m3 cache.
Q_SCALE = 0.02

# The row tolerance (see row_tolerance): err <= ULP * (C_OUT*|o| + C_ABS*(1 + s_rms)*(a + |o|))
C_OUT, C_ABS = 1.0, 1.0


def progress(msg: str) -> None:
    print(f"[gpu_check +{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------
# Correctness cases
# ----------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    seqs: list  # [(seq_len, q_len), ...]: q_len queries at the end of each sequence
    bs: int = 16
    sink_tokens: int = 4
    window: int = 1024  # policy window tokens (multiple of bs)
    hq: int = 32
    hkv: int = 4
    d: int = 128
    dtype: str = "bf16"
    learned_sinks: bool = False
    sliding_window: int | None = None  # the layer's own window
    policy_on: bool = True
    num_splits: int | None = None
    rotary_dim: int | None = None
    neox: bool = True
    q_gain: float = 1.0
    hnd: bool = False  # the cache's physical order [blocks, Hkv, bs, 2D] (FlashInfer's HND) instead of NHD
    q_strided: bool = False  # q a view into a fused [T, Hq + 2 Hkv, D] qkv buffer, as vLLM passes it
    kv_dtype: str | None = None  # "e4m3" / "e5m2": an fp8 cache (q/out stay in `dtype`)
    q_fp8: bool = False  # q as e4m3 with its scale (Q_SCALE), out in `dtype`; with an e4m3 cache
    seq_sinks: list | None = None  # each sequence's own S (the kernel's sink_tokens); None: sink_tokens
    kinds: list = field(default_factory=list)
    seed: int = 0


class Built:
    """A paged cache left the way a live engine leaves it, plus q and metadata.

    K/V are the two strided views vLLM's CUDA backends hand a kernel
    (``kv.split(D, -1)`` of one ``[num_blocks, bs, Hkv, 2D]`` tensor, NHD or, with ``hnd``,
    HND physical order); ``q_strided``: q a view into a fused qkv buffer. Physical blocks
    ``0..N_NAN-1`` are all NaN; every block-table entry outside a sequence's live blocks
    (the freed gap, past the end) holds a stale id: a NaN block, or a block another
    sequence owns (a freed id reused). In live blocks, slots no query of the step attends
    are NaN too. The reference and the kernel read the very same tensors.
    """

    N_NAN = 3

    def __init__(self, spec: Spec, device: str):
        import dataclasses

        from streaming_sink.policy import SinkPolicy
        from streaming_sink.reference_attention import attended_keys
        from streaming_sink.rope import RotaryParams

        s = spec
        self.spec = s
        dtype = DTYPES[s.dtype]
        g = torch.Generator().manual_seed(s.seed)
        gd = torch.Generator(device=device).manual_seed(s.seed)
        self.policy = SinkPolicy(s.sink_tokens, s.window, s.bs) if s.policy_on else None
        # each sequence's own contract (per-request S), and what the kernel is given for it
        self.policies = [self.policy if s.seq_sinks is None else dataclasses.replace(self.policy, sink_tokens=S)
                         for S in (s.seq_sinks or [None] * len(s.seqs))]
        self.seq_sinks = None if s.seq_sinks is None else torch.tensor(s.seq_sinks, dtype=torch.int32,
                                                                        device=device)
        self.max_sink_tokens = None if s.seq_sinks is None else max(s.seq_sinks)
        rope = RotaryParams.default(s.rotary_dim or s.d, base=10000.0, is_neox_style=s.neox)
        self.rope = RotaryParams(rope.inv_freq.to(device), rope.rotary_dim, rope.is_neox_style)
        self.scale = s.d ** -0.5
        bs = s.bs
        keys, live_lists = [], []
        for (seq_len, q_len), policy in zip(s.seqs, self.policies):
            nb = -(-seq_len // bs)
            m = attended_keys(policy, bs, seq_len, q_len, s.sliding_window)
            m = torch.nn.functional.pad(m, (0, nb * bs - seq_len)).view(nb, bs)
            keys.append(m)
            live_lists.append(torch.nonzero(m.any(1)).flatten().tolist())
        n_live = sum(len(x) for x in live_lists)
        num_blocks = self.N_NAN + n_live
        perm = (torch.randperm(n_live, generator=g) + self.N_NAN).tolist()
        width = max(len(k) for k in keys) + 2
        table = torch.zeros(len(s.seqs), width, dtype=torch.int64)
        attended = torch.zeros(num_blocks, bs, dtype=torch.bool)
        owner = torch.full((num_blocks,), -1, dtype=torch.int64)
        for i, k in enumerate(keys):
            for jk in live_lists[i]:
                table[i, jk] = b = perm.pop()
                attended[b] = k[jk]
                owner[b] = i
        # stale ids: half NaN blocks, half blocks of another sequence (a reused freed id)
        self.gap_entries = self.gap_nan = 0
        for i, k in enumerate(keys):
            stale = torch.ones(width, dtype=torch.bool)
            stale[live_lists[i]] = False
            others = torch.nonzero((owner >= 0) & (owner != i)).flatten()
            nan_id = torch.randint(0, self.N_NAN, (width,), generator=g)
            if len(others):
                use_nan = torch.randint(0, 2, (width,), generator=g).bool()
                other_id = others[torch.randint(0, len(others), (width,), generator=g)]
            else:
                use_nan, other_id = torch.ones(width, dtype=torch.bool), nan_id
            table[i] = torch.where(stale, torch.where(use_nan, nan_id, other_id), table[i])
            in_gap = stale & (torch.arange(width) < len(k))  # (past the end: stale too, not counted)
            self.gap_entries += int(in_gap.sum())
            self.gap_nan += int((in_gap & use_nan).sum())
        self.block_table = table.to(torch.int32).to(device)
        self.seq_lens = torch.tensor([a for a, _ in s.seqs], dtype=torch.int32, device=device)
        self.query_start_loc = torch.tensor([0] + [b for _, b in s.seqs]).cumsum(0).to(torch.int32).to(device)
        self.num_tokens = sum(b for _, b in s.seqs)
        attended_d = attended.to(device)
        if s.hnd:
            kv = torch.empty(num_blocks, s.hkv, bs, 2 * s.d, dtype=dtype, device=device).transpose(1, 2)
        else:
            kv = torch.empty(num_blocks, bs, s.hkv, 2 * s.d, dtype=dtype, device=device)
        kv.normal_(generator=gd)
        kv.masked_fill_(~attended_d[:, :, None, None], math.nan)
        self.kv = kv
        self.k_cache, self.v_cache = kv.split(s.d, dim=-1)
        self.k_scale = self.v_scale = None
        if s.kv_dtype:  # what an engine stores: x / scale in fp8, in the same [B, bs, H, 2D] layout
            ks, vs = FP8_SCALES
            kv8 = torch.empty_like(kv, dtype=FP8[s.kv_dtype])
            kv8[..., :s.d] = (self.k_cache.float() / ks).to(kv8.dtype)
            kv8[..., s.d:] = (self.v_cache.float() / vs).to(kv8.dtype)
            self.kv = kv8
            self.k_cache, self.v_cache = kv8.split(s.d, dim=-1)
            self.k_scale = torch.tensor([ks], device=device)  # device tensors, as vLLM's layer._k_scale
            self.v_scale = torch.tensor([vs], device=device)
        q_heads = s.hq + 2 * s.hkv if s.q_strided else s.hq
        self.q = (torch.randn(self.num_tokens, q_heads, s.d, generator=gd, device=device) * s.q_gain).to(dtype)
        self.q = self.q[:, :s.hq]
        self.q8 = None
        if s.q_fp8:  # the kernel gets q8 + its scale; the reference the exact q8 * scale
            self.q8 = (self.q.float() / Q_SCALE).to(torch.float8_e4m3fn)
            self.q = (self.q8.float() * Q_SCALE).to(dtype)  # for the tolerance's |q|
        self.sinks = (torch.randn(s.hq, generator=gd, device=device) * 2) if s.learned_sinks else None
        # per KV head: rms of one key element over the attended keys (for the tolerance)
        kf = self.k_cache.float() * (1.0 if self.k_scale is None else FP8_SCALES[0])
        ok = torch.isfinite(kf)
        self.k_el_rms = (kf.nan_to_num(0.0).pow(2).sum((0, 1, 3)) / ok.sum((0, 1, 3)).clamp_min(1)).sqrt()
        self.max_keys = max(int(k.sum()) for k in keys)  # keys the widest step reads (one sequence)
        self.streaming_rows = self.dense_rows = 0
        for (seq_len, q_len), policy in zip(s.seqs, self.policies):
            for t in range(seq_len - q_len, seq_len):
                if policy is not None and policy.is_streaming(t // bs):
                    self.streaming_rows += 1
                else:
                    self.dense_rows += 1

    def reference(self, v_abs: bool = False) -> torch.Tensor:
        """The torch reference (fp32 math: it casts what it gathers) on the same tensors.
        ``v_abs``: with |V|, which gives a = sum_k p_k |v_k| per output element."""
        from streaming_sink.reference_attention import paged_attention_ref

        k, v = self.k_cache, self.v_cache
        if self.k_scale is not None:  # the same stored bytes, dequantized as the API defines it
            k, v = k.float() * FP8_SCALES[0], v.float() * FP8_SCALES[1]
        v = v.abs() if v_abs else v
        return paged_attention_ref(
            self.q.float() if self.q8 is None else self.q8.float() * Q_SCALE, k, v, self.block_table,
            self.query_start_loc, self.seq_lens,
            self.scale, self.policy, self.rope, self.sinks, self.spec.sliding_window,
            sink_tokens=self.seq_sinks, max_sink_tokens=self.max_sink_tokens).float()

    def kernel(self) -> torch.Tensor:
        from streaming_sink.triton_attention import paged_attention

        kw = {} if self.spec.num_splits is None else {"num_splits": self.spec.num_splits}
        kw.update(sink_tokens=self.seq_sinks, max_sink_tokens=self.max_sink_tokens, k_scale=self.k_scale,
                  v_scale=self.v_scale)
        if self.q8 is not None:
            kw.update(out=torch.empty_like(self.q), q_scale=torch.tensor([Q_SCALE], device=self.q.device))
        return paged_attention(self.q if self.q8 is None else self.q8, self.k_cache, self.v_cache,
                               self.block_table, self.query_start_loc,
                               self.seq_lens, self.scale, self.policy, self.rope, self.sinks,
                               self.spec.sliding_window, **kw)


def row_tolerance(b: Built, o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per output element [T, Hq, D]: how far the kernel may be from the fp32 reference
    from rounding to the cache dtype alone (unit ``u`` = one ulp of that dtype).

    The kernel rounds three things to the cache dtype that the reference keeps in fp32:
    the output (<= u|o|), the softmax weights before P.V (<= u * a, with
    a = sum_k p_k |v_k|, computed by the reference over |V|), and, in streaming rows,
    the query rotated by the per-block delta, which moves each score by ~u * s_rms
    (s_rms = scale * |q| * rms key element: independent roundings add like a random
    walk) and so the output by ~u * s_rms * (a + |o|). Summed:
    tol = u * (|o| + (1 + s_rms) * (a + |o|)), where u, one ulp, is already twice the
    round-to-nearest error bound. The fp32 reference itself is ~1e-6 relative.
    """
    u = ULP[DTYPES[b.spec.dtype]]
    g = b.spec.hq // b.spec.hkv
    k_rms = b.k_el_rms.repeat_interleave(g).to(o.device)  # [Hq]
    s_rms = b.scale * b.q.float().norm(dim=-1) * k_rms[None, :]  # [T, Hq]
    return u * (C_OUT * o.abs() + C_ABS * (1 + s_rms[..., None]) * (a + o.abs())) + 1e-30


def check_case(spec: Spec, device: str, self_test_fail: bool) -> dict:
    t0 = time.monotonic()
    b = Built(spec, device)
    n = b.num_tokens
    if b.gap_entries:  # block-table entries in freed gaps hold stale ids (NaN blocks, other sequences')
        spec.kinds.append("stale_gap")
    row = dict(name=spec.name, kinds=sorted(set(spec.kinds)), dtype=spec.dtype, head_dim=spec.d,
               hq=spec.hq, hkv=spec.hkv, block_size=spec.bs, sink_tokens=spec.sink_tokens,
               window=spec.window if spec.policy_on else None, sliding_window=spec.sliding_window,
               learned_sinks=spec.learned_sinks, num_splits=spec.num_splits, seqs=len(spec.seqs),
               rows=n, streaming_rows=b.streaming_rows, dense_rows=b.dense_rows,
               max_stream_pos=max(a for a, _ in spec.seqs) - 1, max_keys=b.max_keys,
               gap_entries=b.gap_entries, gap_nan_entries=b.gap_nan)
    out = b.kernel()
    if device == "cuda":
        torch.cuda.synchronize()
    out = out[:n].float()
    ref = b.reference()[:n]
    a = b.reference(v_abs=True)[:n]
    tol = row_tolerance(b, ref, a)
    if self_test_fail:  # a deliberately broken result: one element off by 4x its tolerance
        r = n // 2
        out[r, 0, 0] += 4 * tol[r, 0, 0]
    err = (out - ref).abs()
    ratio = (err / tol).nan_to_num(nan=math.inf)  # a NaN anywhere in a row fails it
    row_ratio = ratio.flatten(1).amax(1)
    row_err = err.nan_to_num(nan=math.inf).flatten(1).amax(1)
    ref_finite = torch.isfinite(ref).flatten(1).all(1)
    out_finite = torch.isfinite(out).flatten(1).all(1)
    failed = (row_ratio > 1) | ~ref_finite | ~out_finite
    worst = int(row_ratio.argmax())
    # where the worst rows are (a failing GPU run must say which rows, without rerunning)
    where = []
    for i in row_ratio.argsort(descending=True)[:5].tolist():
        seq = int(torch.searchsorted(b.query_start_loc.cpu(), torch.tensor(i, dtype=torch.int32), right=True)) - 1
        seq_len, q_len = spec.seqs[seq]
        t = seq_len - q_len + (i - int(b.query_start_loc[seq]))
        streaming = b.policies[seq] is not None and b.policies[seq].is_streaming(t // spec.bs)
        where.append(dict(row=i, seq=seq, position=t, regime="streaming" if streaming else "dense",
                          err=float(row_err[i]), err_over_tol=float(row_ratio[i]),
                          out_finite=bool(out_finite[i]), ref_finite=bool(ref_finite[i])))
    row.update(
        max_abs_err=float(row_err.max()), worst_row=worst, worst_row_err=float(row_err[worst]),
        worst_row_tol=float(tol[worst].flatten()[ratio[worst].flatten().argmax()]),
        worst_ratio=float(row_ratio.max()), median_row_ratio=float(row_ratio.median()),
        ref_max_abs=float(ref.abs().max()), rows_failed=int(failed.sum()),
        ref_nonfinite_rows=int((~ref_finite).sum()), out_nonfinite_rows=int((~out_finite).sum()),
        passed=bool(not failed.any()), worst_rows=where, seconds=round(time.monotonic() - t0, 2))
    if self_test_fail:
        row["self_test_fail"] = True
    del b
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def mixed_lens(n: int, dt: int, window: int, g: torch.Generator, deep: int) -> list:
    """Decode lengths: the last dense query, the first streaming ones, a full window past
    the switch, then a random mix of dense, near-switch and deep-stream lengths."""
    fixed = [dt, dt + 1, dt + window + 3, 1]
    lens = fixed[:n]
    while len(lens) < n:
        r = int(torch.randint(0, 3, (1,), generator=g))
        hi = {0: dt, 1: 3 * dt, 2: deep}[r]
        lens.append(int(torch.randint(1, hi, (1,), generator=g)) + 1)
    return lens


def gpu_specs() -> list:
    from streaming_sink.policy import SinkPolicy

    g = torch.Generator().manual_seed(1)
    W = 1024
    dt = SinkPolicy(4, W, 16).dense_tokens  # 1056
    dec = lambda n: [(x, 1) for x in mixed_lens(n, dt, W, g, 100_000)]  # noqa: E731
    W2 = 2048
    dt2 = SinkPolicy(4, W2, 16).dense_tokens
    specs = [
        Spec("decode_b1_d128_bf16", [(70_001, 1)], d=128, kinds=["decode", "split_kv"]),
        Spec("decode_b64_d128_bf16", dec(64), d=128, kinds=["decode", "mixed"], seed=1),
        Spec("decode_b256_d64_bf16", dec(256), d=64, kinds=["decode", "mixed"], seed=2),
        Spec("decode_b256_d128_fp16", dec(256), d=128, dtype="fp16", kinds=["decode", "mixed"], seed=3),
        Spec("decode_b64_d64_fp16_sinks_hnd", dec(64), d=64, dtype="fp16", learned_sinks=True, hnd=True,
             q_strided=True, kinds=["decode", "learned_sinks", "hnd_layout", "q_strided"], seed=4),
        Spec("decode_b64_d64_bf16_layerwin", dec(64), d=64, sliding_window=128, learned_sinks=True,
             kinds=["decode", "layer_window", "learned_sinks"], seed=5),
        Spec("decode_b64_d64_bf16_gptj_partial", dec(64), d=64, rotary_dim=32, neox=False,
             kinds=["decode", "rotary_gptj_partial"], seed=6),
        Spec("decode_b32_d128_bf16_split4", dec(32), d=128, num_splits=4, kinds=["decode", "split_kv"], seed=7),
        Spec("prefill_c512_d128_bf16", [(dt + 300, 512)] + [(x, 1) for x in (5, dt + 9, 40_000)], d=128,
             kinds=["prefill", "mixed"], seed=8),
        Spec("prefill_c2048_d128_bf16", [(50_003, 2048)], window=W2, d=128, kinds=["prefill"], seed=9),
        Spec("prefill_c2048_d64_fp16_switch", [(dt2 + 1000, 2048)], window=W2, d=64, dtype="fp16",
             learned_sinks=True, kinds=["prefill", "learned_sinks"], seed=10),
        Spec("prefill_c512_d64_bf16_layerwin", [(30_011, 512), (700, 512)], d=64, sliding_window=128,
             learned_sinks=True, kinds=["prefill", "layer_window", "learned_sinks", "mixed"], seed=11),
        Spec("mixed_d128_bf16_sinks",
             [(300, 300), (20_000, 512), (dt - 3, 1), (dt + 40, 1)]
             + [(x, 1) for x in mixed_lens(28, dt, W, g, 90_000)],
             d=128, learned_sinks=True, kinds=["mixed", "prefill", "decode", "learned_sinks"], seed=12),
        Spec("policy_off_d128_bf16", [(4000, 512), (3000, 1), (17, 1), (2500, 1)], d=128, policy_on=False,
             kinds=["policy_off", "prefill", "decode"], seed=13),
        Spec("fp32_d128_decode_prefill", [(20_000, 512), (dt + 1, 1), (9000, 1), (dt - 1, 1)], d=128,
             dtype="fp32", learned_sinks=True, kinds=["fp32", "prefill", "decode", "mixed"], seed=14),
        Spec("decode_b64_d128_e4m3_bf16", dec(64), d=128, kv_dtype="e4m3", learned_sinks=True,
             kinds=["decode", "mixed", "fp8_e4m3", "learned_sinks"], seed=15),
        Spec("decode_b1_d128_e5m2_fp16_split", [(70_001, 1)], d=128, dtype="fp16", kv_dtype="e5m2",
             kinds=["decode", "split_kv", "fp8_e5m2"], seed=16),
        Spec("prefill_c2048_d128_e4m3_bf16", [(dt2 + 1000, 2048)], window=W2, d=128, kv_dtype="e4m3",
             kinds=["prefill", "fp8_e4m3"], seed=17),
        # S: the default 4, 0, 20 (not a multiple of 16), 2000 (> the 1024 window), 100
        Spec("per_seq_sinks_d128_bf16", **per_seq(dec(40) + [(30_000, 512), (1500, 700)], [4, 0, 20, 2000, 100]),
             d=128, learned_sinks=True, kinds=["per_seq_sinks", "mixed", "decode", "prefill"], seed=18),
        Spec("per_seq_sinks_d128_e4m3_bf16", **per_seq(dec(40), [4, 0, 20, 2000, 100]), d=128, kv_dtype="e4m3",
             kinds=["per_seq_sinks", "fp8_e4m3", "mixed", "decode"], seed=19),
        Spec("decode_b64_d128_e4m3_fp8q_bf16", dec(64) + [(20_000, 512)], d=128, kv_dtype="e4m3", q_fp8=True,
             learned_sinks=True, kinds=["fp8_query", "fp8_e4m3", "decode", "prefill", "mixed"], seed=20),
    ]
    return specs


def per_seq(seqs: list, values: list) -> dict:
    """``seqs`` and ``seq_sinks`` for a Spec: the sequences take the S values in turn."""
    return dict(seqs=seqs, seq_sinks=[values[i % len(values)] for i in range(len(seqs))])


def interpret_specs() -> list:
    """The same row kinds on tiny shapes (block 4, S=4, window 12 -> dense below 20 tokens)."""
    from streaming_sink.policy import SinkPolicy

    g = torch.Generator().manual_seed(1)
    bs, W = 4, 12
    dt = SinkPolicy(4, W, bs).dense_tokens  # 20
    dec = lambda n: [(x, 1) for x in mixed_lens(n, dt, W, g, 200)]  # noqa: E731
    kw = dict(bs=bs, window=W, hq=8, hkv=1)
    return [
        Spec("decode_b1_d64_bf16", [(151, 1)], d=64, num_splits=3, kinds=["decode", "split_kv"], **kw),
        Spec("decode_b8_d128_bf16", dec(8), d=128, kinds=["decode", "mixed"], seed=1, **kw),
        Spec("decode_b16_d64_fp16_sinks_hnd", dec(16), d=64, dtype="fp16", learned_sinks=True, hnd=True,
             q_strided=True, kinds=["decode", "mixed", "learned_sinks", "hnd_layout", "q_strided"], seed=2, **kw),
        Spec("decode_b8_d64_bf16_layerwin", dec(8), d=64, sliding_window=6, learned_sinks=True,
             kinds=["decode", "layer_window", "learned_sinks"], seed=3, **kw),
        Spec("prefill_c24_d64_bf16_switch", [(dt + 10, 24), (77, 12), (9, 1)], d=64,
             kinds=["prefill", "mixed"], seed=4, **kw),
        Spec("prefill_c12_d128_fp16_layerwin", [(90, 12)], d=128, dtype="fp16", sliding_window=6,
             kinds=["prefill", "layer_window"], seed=5, **kw),
        Spec("policy_off_d64_bf16", [(30, 8), (13, 1)], d=64, policy_on=False,
             kinds=["policy_off", "prefill", "decode"], seed=6, **kw),
        Spec("fp32_d64_gptj_partial", [(60, 9), (dt + 1, 1)], d=64, dtype="fp32", rotary_dim=32, neox=False,
             learned_sinks=True, kinds=["fp32", "prefill", "decode", "rotary_gptj_partial"], seed=7, **kw),
        # S per sequence: the default 4, 0, 6 (not a multiple of 4), 17 (> the 12-token window)
        Spec("per_seq_sinks_e4m3_bf16", **per_seq([(21, 1), (13, 1), (25, 1), (70, 1), (40, 6), (33, 5)],
                                                  [4, 0, 6, 17]),
             d=64, kv_dtype="e4m3", learned_sinks=True, kinds=["per_seq_sinks", "fp8_e4m3", "decode", "prefill"],
             seed=8, **kw),
        Spec("decode_b4_d64_e5m2_fp16_split", dec(4), d=64, dtype="fp16", kv_dtype="e5m2", num_splits=2,
             kinds=["decode", "fp8_e5m2", "split_kv"], seed=9, **kw),
        Spec("decode_b6_d64_e4m3_fp8q_bf16", dec(6), d=64, kv_dtype="e4m3", q_fp8=True, learned_sinks=True,
             kinds=["decode", "mixed", "fp8_e4m3", "fp8_query"], seed=10, **kw),
    ]


def add_auto_kinds(spec: Spec) -> None:
    spec.kinds += [spec.dtype, f"head_dim_{spec.d}"]
    if spec.hq // spec.hkv == 8:
        spec.kinds.append("gqa_8to1")


def run_correctness(device: str, interpret: bool, args) -> list:
    specs = interpret_specs() if interpret and not args.gpu_shapes else gpu_specs()
    for s in specs:
        add_auto_kinds(s)
    if args.only:
        specs = [s for s in specs if any(o in s.name for o in args.only.split(","))]
    rows = []
    for i, s in enumerate(specs):
        progress(f"correctness {i + 1}/{len(specs)}: {s.name}")
        try:
            row = check_case(s, device, args.self_test_fail)
        except Exception as e:  # a crash is a failed row (and said exactly)
            row = dict(name=s.name, kinds=sorted(set(s.kinds)), dtype=s.dtype, head_dim=s.d, passed=False,
                       error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
            print(row["traceback"], flush=True)
        rows.append(row)
        r = row
        if "error" in r:
            print(f"    FAIL  {r['error']}", flush=True)
        else:
            print(f"    {'ok  ' if r['passed'] else 'FAIL'}  rows {r['rows']} (streaming {r['streaming_rows']}), "
                  f"worst err/tol {r['worst_ratio']:.3f}, max err {r['max_abs_err']:.2e}, "
                  f"failed rows {r['rows_failed']}, {r['seconds']:.1f}s", flush=True)
            if not r["passed"]:
                w = r["worst_rows"][0]
                print(f"          worst row {w['row']}: sequence {w['seq']}, position {w['position']} ({w['regime']}), "
                      f"err {w['err']:.3g} = {w['err_over_tol']:.2f}x tol, out finite {w['out_finite']}, "
                      f"ref finite {w['ref_finite']}", flush=True)
    return rows


# ----------------------------------------------------------------------------
# Timing (GPU; --interpret --timing-smoke runs the same code on tiny CPU shapes)
# ----------------------------------------------------------------------------
@dataclass
class TCfg:
    """What the timing sections measure. The GPU default is a Llama-3-8B-like layer."""

    device: str = "cuda"
    hq: int = 32
    hkv: int = 8
    d: int = 128
    bs: int = 16
    sinks: int = 4
    lives: tuple = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
    batches: tuple = (1, 8, 32, 64, 128, 256)
    chunks: tuple = (512, 2048)
    window: int = 4096  # prefill and cost-follows window
    far: int = 131072  # the far stream position of cost-follows
    cost_batch: int = 32
    cost_chunk: int = 512
    copy_elems: int = 1 << 30  # bf16 elements copied (2 GiB)
    smoke: bool = False

    def model(self) -> str:
        return f"bf16, {self.hq}q/{self.hkv}kv heads, D={self.d}, block {self.bs}, S={self.sinks}"


def smoke_cfg() -> TCfg:
    return TCfg(device="cpu", hq=8, hkv=2, d=32, bs=16, lives=(48, 96), batches=(1, 3), chunks=(32,), window=64,
                far=4096, cost_batch=2, cost_chunk=16, copy_elems=1 << 22, smoke=True)


TDTYPE = torch.bfloat16


class Timer:
    def __init__(self, reps: int, device: str, warmup: int = 3):
        self.reps, self.warmup, self.device = reps, warmup, device
        if device == "cuda":
            self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # > L2 (50 MiB on H100)

    def __call__(self, fn) -> float:
        """Median milliseconds of ``fn()`` (CUDA events, L2 flushed before each run)."""
        if self.device != "cuda":  # smoke run: wall clock, not a measurement
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        ev = []
        for _ in range(self.reps):
            self.flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            ev.append((a, b))
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in ev)


def empty_cache(cfg: TCfg) -> None:
    if cfg.device == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(timer: Timer, cfg: TCfg) -> float:
    """Bytes/s of a device-to-device ``copy_`` of a large buffer (read + write counted)."""
    n = cfg.copy_elems
    src = torch.empty(n, dtype=torch.bfloat16, device=cfg.device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    empty_cache(cfg)
    return 2 * n * 2 / (ms * 1e-3)


def stream_setup(cfg: TCfg, batch: int, window: int, q_len: int, seq_len: int, seed: int = 0):
    """``batch`` sequences at ``seq_len`` (the last ``q_len`` tokens are queries), policy
    window ``window``: only the live blocks are allocated; the freed gap points at a NaN block."""
    from streaming_sink.policy import SinkPolicy
    from streaming_sink.rope import RotaryParams

    bs, dev = cfg.bs, cfg.device
    g = torch.Generator().manual_seed(seed)
    policy = SinkPolicy(cfg.sinks, window, bs)
    first_j, last_j = (seq_len - q_len) // bs, (seq_len - 1) // bs
    live = sorted({b for j in range(first_j, last_j + 1) for b in policy.live_blocks(j)})
    num_blocks = batch * len(live) + 1
    kv = torch.empty(num_blocks, bs, cfg.hkv, 2 * cfg.d, dtype=TDTYPE, device=dev).normal_()
    kv[0] = math.nan  # what the freed gap points at: a finite output proves it was not read
    k_cache, v_cache = kv.split(cfg.d, dim=-1)
    table = torch.zeros(batch, last_j + 1, dtype=torch.int32)
    table[:, live] = (torch.randperm(num_blocks - 1, generator=g) + 1).view(batch, len(live)).to(torch.int32)
    q = torch.randn(batch * q_len, cfg.hq, cfg.d, generator=g).to(device=dev, dtype=TDTYPE)
    rope = RotaryParams.default(cfg.d)
    rope = RotaryParams(rope.inv_freq.to(dev), rope.rotary_dim, rope.is_neox_style)
    keys = [policy.sink_tokens + t - policy.window_start(t // bs) + 1 if policy.is_streaming(t // bs) else t + 1
            for t in range(seq_len - q_len, seq_len)]  # = len(policy.attended_keys(t))
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table.to(dev),
              query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev) * q_len,
              seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device=dev),
              scale=cfg.d ** -0.5, policy=policy, rope=rope, out=torch.empty_like(q),
              max_query_len=q_len)
    return kw, keys, kv


def run_kernel(kw):
    from streaming_sink.triton_attention import paged_attention

    return paged_attention(**kw)


def finite(kw) -> bool:
    return bool(torch.isfinite(kw["out"]).all())


def run_bandwidth(timer: Timer, cfg: TCfg, copy_bw: float, args, deadline: float) -> dict:
    lives, batches = cfg.lives, cfg.batches
    if args.quick and not cfg.smoke:
        lives, batches = (1024, 8192, 32768, 131072), (1, 32, 256)
    bytes_per_token = cfg.hkv * cfg.d * 2 * 2  # K and V, bf16
    cap = args.max_kv_gib * (1 << 30)
    rows = []
    for live in lives:
        window = live - cfg.bs  # sinks + window + half the own block ~ live
        for batch in batches:
            point = dict(live_target=live, batch=batch)
            if batch * live * bytes_per_token > cap:
                point["skipped"] = f"K/V over --max-kv-gib {args.max_kv_gib:g}"
                rows.append(point)
                continue
            if time.monotonic() > deadline:
                point["skipped"] = "time budget (--budget-s)"
                rows.append(point)
                continue
            progress(f"decode bandwidth: live {live}, batch {batch}")
            try:
                seq_len = 3 * (window + 2 * cfg.bs) + cfg.bs // 2  # deep in the streaming regime
                kw, keys, kv = stream_setup(cfg, batch, window, 1, seq_len)
                ms = timer(lambda: run_kernel(kw))
                live_bytes = batch * keys[0] * bytes_per_token
                point.update(live_keys=keys[0], ms=ms, gbps=live_bytes / ms / 1e6,
                             share_of_copy=live_bytes / (ms * 1e-3) / copy_bw, finite=finite(kw))
                del kw, kv
            except Exception as e:
                kw = kv = None  # release this point's buffers before the next one
                point["error"] = f"{type(e).__name__}: {e}"
                print(f"    ERROR {point['error']}", flush=True)
            empty_cache(cfg)
            rows.append(point)
    return dict(copy_gbps=copy_bw / 1e9, model=cfg.model(), rows=rows)


def sdpa_flash(q4, k4, v4):
    """SDPA on the flash backend, native GQA; else K/V expanded to every query head
    (still flash: same FLOPs, more K/V reads). Returns (fn, how)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(k, v, gqa):
        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q4, k, v, enable_gqa=gqa)
        return fn

    try:
        fn = make(k4, v4, True)
        fn()
        return fn, "flash, native GQA"
    except RuntimeError:
        g = q4.shape[1] // k4.shape[1]
        fn = make(k4.repeat_interleave(g, 1), v4.repeat_interleave(g, 1), False)
        fn()
        return fn, "flash, K/V expanded"


def run_prefill(timer: Timer, cfg: TCfg, args, deadline: float) -> dict:
    window, bs = cfg.window, cfg.bs
    rows = []
    for chunk in (cfg.chunks[-1:] if args.quick else cfg.chunks):
        if time.monotonic() > deadline:
            rows.append(dict(chunk=chunk, skipped="time budget (--budget-s)"))
            continue
        progress(f"prefill: chunk {chunk} over a {window}-token window vs SDPA flash")
        row = dict(chunk=chunk, window=window)
        try:
            seq_len = 3 * (window + 2 * bs) + 5
            kw, keys, kv = stream_setup(cfg, 1, window, chunk, seq_len)
            flops = 4 * cfg.hq * cfg.d * sum(keys)
            ours = timer(lambda: run_kernel(kw))
            row.update(keys_per_query=round(sum(keys) / len(keys)), ours_ms=ours, ours_tflops=flops / ours / 1e9,
                       finite=finite(kw))
            n_keys = row["keys_per_query"]  # SDPA: the same keys per query, non-causal
            q4 = kw["q"].view(1, chunk, cfg.hq, cfg.d).transpose(1, 2)
            k4 = torch.empty(1, cfg.hkv, n_keys, cfg.d, dtype=TDTYPE, device=cfg.device).normal_()
            v4 = torch.empty_like(k4).normal_()
            try:
                fn, how = sdpa_flash(q4, k4, v4)
                base = timer(fn)
                base_flops = 4 * cfg.hq * cfg.d * chunk * n_keys
                row.update(sdpa_backend=how, sdpa_ms=base, sdpa_tflops=base_flops / base / 1e9,
                           ratio=(ours / flops) / (base / base_flops))
            except RuntimeError as e:
                row["sdpa_error"] = f"flash backend unavailable: {str(e)[:200]}"
            del kw, kv, k4, v4
        except Exception as e:
            kw = kv = k4 = v4 = None  # release this point's buffers before the next one
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"    ERROR {row['error']}", flush=True)
        empty_cache(cfg)
        rows.append(row)
    return dict(model=cfg.model() + ", batch 1", rows=rows)


def run_cost_follows(timer: Timer, cfg: TCfg, args, deadline: float) -> dict:
    window, bs = cfg.window, cfg.bs
    dense = (-(-cfg.sinks // bs) + window // bs + 1) * bs  # first streaming position (4128)
    rows = []
    for what, batch, q_len in (("decode", cfg.cost_batch, 1), ("prefill", 1, cfg.cost_chunk)):
        if time.monotonic() > deadline:
            rows.append(dict(what=what, skipped="time budget (--budget-s)"))
            continue
        progress(f"cost follows live KV: {what}, window {window}, position {dense} vs {cfg.far}")
        row = dict(what=what, batch=batch, q_len=q_len, window=window)
        try:
            res = {}
            # the same offset in its block at both positions: the same live keys per query
            for name, start in (("near", dense + bs // 2), ("far", cfg.far + bs // 2)):
                kw, keys, kv = stream_setup(cfg, batch, window, q_len, start + q_len, seed=3)
                res[name] = (timer(lambda: run_kernel(kw)), start, sum(keys))
                row[f"{name}_finite"] = finite(kw)
                del kw, kv
                empty_cache(cfg)
            if res["near"][2] != res["far"][2]:
                raise AssertionError(f"live keys differ: {res['near'][2]} vs {res['far'][2]}")
            row.update(near_pos=res["near"][1], far_pos=res["far"][1], near_ms=res["near"][0],
                       far_ms=res["far"][0], keys=res["near"][2], ratio=res["far"][0] / res["near"][0])
        except Exception as e:
            kw = kv = None  # release this point's buffers before the next one
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"    ERROR {row['error']}", flush=True)
        rows.append(row)
    return dict(tolerance=args.cost_tolerance, rows=rows)


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def run_cudagraph(cfg: TCfg) -> dict:
    """The streaming decode call captured in a CUDA graph and replayed: a batch where
    every other sequence is masked out (the engine's own kernel's rows), split partials
    in a persistent workspace. Eager runs under ``torch.cuda.set_sync_debug_mode("error")``
    (any host sync raises); the replay must equal eager bit for bit, before and after the
    step's metadata (lengths, mask, queries) changes in place. This is what vLLM's FULL
    cudagraph modes would do with the policy's decode path; the adapter refuses them
    until this passes on a device (docs/gpu.md). Twice: the bf16 cache, and an e4m3 cache
    (scale tensors, as vLLM's ``layer._k_scale``) and an e4m3 query with its ``q_scale``, with per-sequence S (a device tensor),
    both changed in place between replays too."""
    variants = {v: _cudagraph_variant(cfg, v == "e4m3_per_seq_sinks") for v in ("bf16", "e4m3_per_seq_sinks")}
    return dict(name="cudagraph_decode_replay", passed=all(r["passed"] for r in variants.values()), **variants)


def _cudagraph_variant(cfg: TCfg, fp8_per_seq: bool) -> dict:
    from streaming_sink.triton_attention import paged_attention, workspace_elems

    batch, window = 32, 1024
    seq_len = 8 * window + cfg.bs // 2  # mid-block: one more token stays in the same block
    kw, _, _ = stream_setup(cfg, batch, window, 1, seq_len, seed=3)
    dev = kw["q"].device
    kw["seq_mask"] = (torch.arange(batch, device=dev) % 2).to(torch.int32)
    kw["workspace"] = torch.empty(workspace_elems(cfg.hq, cfg.hkv, cfg.d, dev), dtype=torch.float32, device=dev)
    if fp8_per_seq:  # S <= bs: every sequence's live blocks are among the ones stream_setup filled
        kw["sink_tokens"] = torch.tensor([4, 0, 9, cfg.bs], dtype=torch.int32, device=dev).repeat(batch // 4)
        kw["max_sink_tokens"] = cfg.bs
        kw["k_cache"], kw["v_cache"] = (x.to(torch.float8_e4m3fn) for x in (kw["k_cache"], kw["v_cache"]))
        kw["k_scale"], kw["v_scale"] = torch.tensor([0.5], device=dev), torch.tensor([0.25], device=dev)
        # the query as vLLM's layer hands it to TRITON_ATTN / FA3 with an e4m3 cache
        kw["q_scale"] = torch.tensor([Q_SCALE], device=dev)
        kw["q"] = (kw["q"].float() / Q_SCALE).to(torch.float8_e4m3fn)
    kw["out"].fill_(7.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        paged_attention(**kw)  # eager, and the warm-up (compiles) outside the capture
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = [kw["out"].clone()]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_attention(**kw)
        with torch.cuda.graph(graph, stream=stream):
            paged_attention(**kw)
    torch.cuda.current_stream().wait_stream(stream)
    kw["out"].fill_(7.0)
    graph.replay()
    replays = [kw["out"].clone()]
    kw["seq_lens"].add_(1)  # the next step, in place: what vLLM's persistent buffers do
    kw["seq_mask"].copy_(1 - kw["seq_mask"])
    kw["q"].copy_((torch.randn(kw["q"].shape, device=dev) / (Q_SCALE if fp8_per_seq else 1.0)).to(kw["q"].dtype))
    if fp8_per_seq:
        kw["sink_tokens"].copy_(kw["sink_tokens"].roll(1))
        kw["k_scale"].mul_(2.0)
        kw["v_scale"].mul_(0.5)
        kw["q_scale"].mul_(1.5)
    kw["out"].fill_(7.0)
    graph.replay()
    replays.append(kw["out"].clone())
    kw["out"].fill_(7.0)
    paged_attention(**kw)
    eager.append(kw["out"].clone())
    torch.cuda.synchronize()
    same = [bool(torch.equal(a, b)) for a, b in zip(eager, replays)]
    untouched = bool((eager[1].view(batch, -1)[0::2] == 7.0).all())  # masked-out rows of step 2
    finite = bool(torch.isfinite(eager[1].view(batch, -1)[1::2]).all())  # the NaN gap never read
    return dict(passed=all(same) and untouched and finite, replay_equals_eager=same,
                masked_rows_untouched=untouched, computed_rows_finite=finite, batch=batch, seq_len=seq_len,
                window=window)


def print_correctness(rows: list) -> None:
    print("\n## correctness: Triton kernel vs torch reference (fp32 math, same cache), per query row")
    hdr = (f"{'case':<34} {'dtype':>5} {'D':>4} {'rows':>5} {'strm':>5} {'keys':>6} {'gap':>6} "
           f"{'max err':>9} {'worst err/tol':>13} {'failed':>6}  result")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<34} {r['dtype']:>5} {r['head_dim']:>4}  ERROR {r['error'][:80]}")
            continue
        print(f"{r['name']:<34} {r['dtype']:>5} {r['head_dim']:>4} {r['rows']:>5} {r['streaming_rows']:>5} "
              f"{r['max_keys']:>6} {r['gap_entries']:>6} {r['max_abs_err']:>9.2e} {r['worst_ratio']:>13.3f} "
              f"{r['rows_failed']:>6}  {'PASS' if r['passed'] else 'FAIL'}")
    print("(rows: query rows; strm: of them in the streaming regime; keys: most keys one sequence's step "
          "reads; gap: stale block-table entries in freed gaps; err/tol <= 1 passes, per row)")


def print_timing(res: dict) -> None:
    bw = res.get("bandwidth")
    if bw:
        print(f"\n## decode bandwidth: {bw['model']}; device copy {bw['copy_gbps']:.0f} GB/s (read+write)")
        hdr = f"{'live':>7} {'batch':>5} | {'us':>9} {'live GB/s':>9} {'% copy':>7}"
        print(hdr)
        print("-" * len(hdr))
        for p in bw["rows"]:
            if "ms" in p:
                print(f"{p['live_keys']:>7} {p['batch']:>5} | {p['ms'] * 1e3:>9.1f} {p['gbps']:>9.0f} "
                      f"{100 * p['share_of_copy']:>6.1f}%")
            else:
                print(f"{p['live_target']:>7} {p['batch']:>5} | {p.get('skipped') or p.get('error')}")
    pf = res.get("prefill")
    if pf:
        print(f"\n## prefill: {pf['model']}; SDPA flash non-causal over the same keys per query")
        hdr = (f"{'chunk':>6} {'keys/q':>7} | {'ours ms':>8} {'TFLOP/s':>8} | {'sdpa ms':>8} {'TFLOP/s':>8} | "
               f"{'ours/sdpa':>9}")
        print(hdr)
        print("-" * len(hdr))
        for r in pf["rows"]:
            if "ours_ms" in r:
                sd = (f"{r['sdpa_ms']:>8.3f} {r['sdpa_tflops']:>8.1f} | {r['ratio']:>8.2f}x  ({r['sdpa_backend']})"
                      if "sdpa_ms" in r
                      else r.get("sdpa_error", "")[:60])
                print(f"{r['chunk']:>6} {r['keys_per_query']:>7} | {r['ours_ms']:>8.3f} {r['ours_tflops']:>8.1f} | "
                      f"{sd}")
            else:
                print(f"{r['chunk']:>6} | {r.get('skipped') or r.get('error')}")
    cf = res.get("cost_follows_live")
    if cf:
        print(f"\n## cost follows live KV: the same live keys near the switch and deep in the stream "
              f"(tolerance {100 * cf['tolerance']:.0f}%)")
        for r in cf["rows"]:
            if "ratio" in r:
                print(f"{r['what']:>8} batch {r['batch']:>3} x {r['q_len']:>3} queries, {r['keys']} keys: "
                      f"pos {r['near_pos']}: {r['near_ms'] * 1e3:.1f} us, pos {r['far_pos']}: "
                      f"{r['far_ms'] * 1e3:.1f} us -> {r['ratio']:.3f}x")
            else:
                print(f"{r['what']:>8}: {r.get('skipped') or r.get('error')}")


def goals(res: dict, interpret: bool) -> list:
    out = []
    corr = [r for r in res["correctness"] if r["dtype"] == "bf16"]
    bad = [r["name"] for r in corr if not r.get("passed")]
    out.append(dict(goal="bf16 rows within bf16 rounding, per row",
                    status="PASS" if corr and not bad else "MISS",
                    detail=(f"{len(corr)} bf16 cases, worst err/tol "
                            f"{max((r.get('worst_ratio', math.inf) for r in corr), default=math.nan):.3f}"
                            + (f"; failing: {', '.join(bad)}" if bad else ""))
                    + (" (interpreter: round-toward-zero bf16, IEEE dots)" if interpret else "")))
    if interpret:
        for g in ("decode >= 80% of copy bandwidth at live >= 8k, batch >= 32",
                  "prefill <= 1.3x SDPA-flash time over equal live keys",
                  "cost follows live KV (position 128k vs 4k)"):
            smoke = ", --timing-smoke: the code ran, the numbers mean nothing" if "bandwidth" in res else ""
            out.append(dict(goal=g, status="NOT RUN", detail=f"timing needs a GPU (--interpret{smoke})"))
        return out
    bw = res.get("bandwidth") or {}
    pts = [p for p in bw.get("rows", []) if "share_of_copy" in p and p["live_keys"] >= 8192 and p["batch"] >= 32]
    if pts:
        w = min(pts, key=lambda p: p["share_of_copy"])
        out.append(dict(goal="decode >= 80% of copy bandwidth at live >= 8k, batch >= 32",
                        status="PASS" if w["share_of_copy"] >= 0.8 else "MISS",
                        detail=f"{len(pts)} points, lowest {100 * w['share_of_copy']:.1f}% (live {w['live_keys']}, "
                               f"batch {w['batch']}), median "
                               f"{100 * statistics.median(p['share_of_copy'] for p in pts):.1f}%"))
    else:
        out.append(dict(goal="decode >= 80% of copy bandwidth at live >= 8k, batch >= 32", status="NOT RUN",
                        detail="no qualifying point measured"))
    pr = [r for r in (res.get("prefill") or {}).get("rows", []) if "ratio" in r]
    if pr:
        w = max(pr, key=lambda r: r["ratio"])
        out.append(dict(goal="prefill <= 1.3x SDPA-flash time over equal live keys",
                        status="PASS" if w["ratio"] <= 1.3 else "MISS",
                        detail=", ".join(f"chunk {r['chunk']}: {r['ratio']:.2f}x" for r in pr)))
    else:
        out.append(dict(goal="prefill <= 1.3x SDPA-flash time over equal live keys", status="NOT RUN",
                        detail="no prefill comparison measured"))
    cf = res.get("cost_follows_live") or {}
    cr = [r for r in cf.get("rows", []) if "ratio" in r]
    if cr:
        tol = cf["tolerance"]
        ok = all(abs(r["ratio"] - 1) <= tol and r["near_finite"] and r["far_finite"] for r in cr)
        out.append(dict(goal=f"cost follows live KV: position 128k within {100 * tol:.0f}% of position 4k",
                        status="PASS" if ok else "MISS",
                        detail=", ".join(f"{r['what']}: {r['ratio']:.3f}x" for r in cr)))
    else:
        out.append(dict(goal="cost follows live KV (position 128k vs 4k)", status="NOT RUN", detail="not measured"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--interpret", action="store_true",
                   help="CPU under the Triton interpreter, tiny shapes, correctness only")
    p.add_argument("--quick", action="store_true", help="smaller timing grid and fewer repetitions")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="timing points past this many seconds since start are skipped (default 420)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per point (default 20, quick 10)")
    p.add_argument("--max-kv-gib", type=float, default=32.0, help="largest K/V allocation of a bandwidth point")
    p.add_argument("--cost-tolerance", type=float, default=0.10,
                   help="allowed relative time difference between positions 4k and 128k (default 0.10)")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only matching correctness cases")
    p.add_argument("--skip-timing", action="store_true", help="correctness only")
    p.add_argument("--timing-smoke", action="store_true",
                   help="with --interpret: run the timing code on tiny CPU shapes (exercises it; numbers mean nothing)")
    p.add_argument("--gpu-shapes", action="store_true",
                   help="with --interpret: the GPU's correctness cases (slow on a CPU; use with --only)")
    p.add_argument("--self-test-fail", action="store_true",
                   help="perturb one output element per case by 4x its tolerance: every case must FAIL, exit 1")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json or ./gpu_check.json)")
    args = p.parse_args()
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT") or Path.cwd()) / "gpu_check.json"

    try:
        import triton
    except ImportError as e:
        print(f"gpu_check: cannot import triton ({e})", file=sys.stderr)
        return 2
    before = {m.split(".")[0] for m in sys.modules}
    from streaming_sink import reference_attention, triton_attention  # noqa: F401
    extra = sorted({m.split(".")[0] for m in sys.modules} - before - {"streaming_sink"})
    interpret = args.interpret
    if interpret:
        if not triton_attention._INTERPRETED:
            print("gpu_check: TRITON_INTERPRET=1 did not take effect", file=sys.stderr)
            return 2
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False). "
                  "Run with --interpret on a CPU.", file=sys.stderr)
            return 2
        device = "cuda"
    dev_name = (torch.cuda.get_device_name() if device == "cuda"
                else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    res = dict(device=dev_name, mode="interpret" if interpret else "gpu", quick=args.quick,
               torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               cuda=torch.version.cuda, extra_imports=extra, repo_commit=repo_commit(),
               started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               tolerance=dict(ulp={k: ULP[v] for k, v in DTYPES.items()}, c_out=C_OUT, c_abs=C_ABS,
                              formula="per element err <= ulp * (c_out*|o| + c_abs*(1 + s_rms)*(a + |o|)); "
                                      "each query row passes on its own"))
    progress(f"device: {dev_name}; torch {torch.__version__}, triton {triton.__version__}; "
             f"imports beyond torch/triton/stdlib: {', '.join(extra) or 'none'}")

    # the reference's fp32 matmuls must not run in TF32 (its error would reach fp16's rounding)
    torch.set_float32_matmul_precision("highest")
    res["correctness"] = run_correctness(device, interpret, args)
    deadline = T0 + args.budget_s
    smoke = interpret and args.timing_smoke
    if (interpret and not smoke) or args.skip_timing:
        why = "--interpret: the interpreter says nothing about speed" if interpret else "--skip-timing"
        progress(f"timing sections skipped ({why})")
        res["timing_skipped"] = why
    else:
        cfg = smoke_cfg() if smoke else TCfg()
        if smoke:
            res["timing_smoke"] = "timing code run on tiny CPU shapes under the interpreter: not measurements"
            progress("timing sections as a smoke run (--timing-smoke): the numbers mean nothing")
        save(res, out_path)  # correctness is on disk even if a timing section never returns
        try:
            timer = Timer(args.reps or (10 if args.quick else 20), cfg.device)
            progress(f"copy bandwidth ({cfg.copy_elems * 2 >> 20} MiB device-to-device copy_)")
            copy_bw = copy_bandwidth(timer, cfg)
            res["copy_gbps"] = copy_bw / 1e9
            res["prefill"] = run_prefill(timer, cfg, args, deadline)
            save(res, out_path)
            res["cost_follows_live"] = run_cost_follows(timer, cfg, args, deadline)
            save(res, out_path)
            res["bandwidth"] = run_bandwidth(timer, cfg, copy_bw, args, deadline)
        except Exception as e:  # timing never changes the exit code; say what broke
            res["timing_error"] = f"{type(e).__name__}: {e}"
            progress(f"timing stopped: {res['timing_error']}")
            traceback.print_exc()

    if device == "cuda":  # capture + replay of the decode call (a correctness row: exit code)
        progress("CUDA graph: capture and replay of the streaming decode call vs eager")
        try:
            res["cudagraph"] = run_cudagraph(TCfg())
        except Exception as e:
            res["cudagraph"] = dict(name="cudagraph_decode_replay", passed=False, error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        progress(f"CUDA graph: {res['cudagraph']}")
    else:
        res["cudagraph"] = dict(name="cudagraph_decode_replay", skipped="no CUDA graphs off the GPU")
    res["goals"] = goals(res, interpret)
    failed = [r["name"] for r in res["correctness"] if not r.get("passed")]
    if not res["cudagraph"].get("passed", True):
        failed.append("cudagraph_decode_replay")
    code = 0 if res["correctness"] and not failed else 1
    res.update(exit_code=code, elapsed_s=round(time.monotonic() - T0, 1), failed_cases=failed)

    print(f"\n# gpu_check on {dev_name} (torch {torch.__version__}, triton {triton.__version__}"
          f"{', CUDA ' + torch.version.cuda if device == 'cuda' and torch.version.cuda else ''})")
    print_correctness(res["correctness"])
    if "timing_skipped" in res:
        print(f"\ntiming sections skipped: {res['timing_skipped']}")
    else:
        if "timing_smoke" in res:
            print(f"\n(timing smoke run: {res['timing_smoke']})")
        print_timing(res)
    print("\n## goals")
    for g in res["goals"]:
        print(f"{g['status']:<8} {g['goal']}: {g['detail']}")
    cg = res["cudagraph"]
    print(f"\ncudagraph_decode_replay: " + (f"skipped ({cg['skipped']})" if "skipped" in cg else
                                          ("PASS" if cg["passed"] else "FAIL") + f" {cg}"))
    print(f"\ncorrectness: {len(res['correctness']) - len(failed)}/{len(res['correctness'])} cases passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + f"; exit code {code}; {res['elapsed_s']:.1f} s")
    if "timing_error" in res:
        print(f"timing stopped early: {res['timing_error']}")
    save(res, out_path)
    print(f"JSON: {out_path}")
    return code


def save(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(path)


def repo_commit() -> str | None:
    import subprocess

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "streaming_sink"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + (" + uncommitted streaming_sink changes" if dirty else "")) or None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
