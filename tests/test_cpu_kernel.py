"""The compiled CPU kernel (streaming_sink/cpu_attention.py) against the oracle and
the torch reference, on the property harness of test_core_properties.py: random
policies and shapes, shuffled physical blocks, stale ids in the freed gap pointing
at NaN blocks, mixed dense/streaming batches, chunks across the switch, GQA,
partial rotary, NeoX and GPT-J styles, learned sinks, layer windows.

Plus what only the kernel has: the engines' cache layouts (vLLM CPU_ATTN's
dim-major keys, SGLang's token pool), bf16/fp16 and fp8 (e4m3, e5m2, with k/v
scales) caches read in place, int32 tables, ``seq_ids`` (only some sequences' rows)
and ``table_rows``; per-sequence sink lengths (``sink_tokens``) against the oracle.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from oracle import Contract, oracle_attention
from test_core_properties import attention_cases, build_paged_case, run_oracle, run_ref

from streaming_sink.reference_attention import paged_attention_ref

from streaming_sink.cpu_attention import paged_attention_cpu, rotation_table
from streaming_sink.policy import SinkPolicy
from streaming_sink.rope import RotaryParams, rotate

PROPS = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_kernel(case, pc, **overrides):
    return run_ref(case, pc, fn=paged_attention_cpu, **overrides)


def dim_major(cache: torch.Tensor) -> torch.Tensor:
    """The same cache stored as vLLM's CPU_ATTN keys: per block and head [D, block_size]."""
    return cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


@PROPS
@given(attention_cases())
def test_kernel_matches_oracle(case):
    c = case["c"]
    event("policy off" if c.off else "policy on")
    pc = build_paged_case(case)
    want = run_oracle(case, pc)
    got = run_kernel(case, pc)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all(), "read a stale (NaN) block"
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # vLLM's CPU layout (keys dim-major) and an int64 table: the same numbers.
    pc64 = dict(pc, table=pc["table"].long())
    torch.testing.assert_close(run_kernel(case, pc64, k_cache=dim_major(pc["k_cache"])), got, rtol=1e-5, atol=1e-5)


@PROPS
@given(attention_cases(), st.sampled_from([torch.bfloat16, torch.float16]), st.booleans())
def test_half_caches_match_reference(case, dtype, q_in_cache_dtype):
    """bf16/fp16 caches read in place (no float copy) compute what the reference
    computes from the same stored values; q and out may be float32 or the cache's dtype."""
    pc = build_paged_case(case)
    if dtype == torch.float16:  # the harness's garbage blocks (x100) and NaN stay in range
        pc = dict(pc, k_cache=pc["k_cache"].clamp(-6e4, 6e4), v_cache=pc["v_cache"].clamp(-6e4, 6e4))
    kc, vc = pc["k_cache"].to(dtype), pc["v_cache"].to(dtype)
    q = pc["q"].to(dtype) if q_in_cache_dtype else pc["q"]
    want = run_ref(case, dict(pc, q=q, k_cache=kc, v_cache=vc))
    got = run_kernel(case, pc, k_cache=dim_major(kc), v_cache=vc, q=q)
    assert got.dtype == q.dtype and torch.isfinite(got).all()
    tol = 2e-2 if q_in_cache_dtype else 1e-4  # one rounding of the output to bf16/fp16
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@PROPS
@given(attention_cases().filter(lambda c: len(c["seqs"]) > 1), st.data())
def test_seq_ids_computes_only_those_rows(case, data):
    pc = build_paged_case(case)
    n = len(case["seqs"])
    ids = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1), label="seq_ids"))
    full = run_kernel(case, pc)
    out = torch.full_like(pc["q"], 7.0)
    run_kernel(case, pc, out=out, seq_ids=torch.tensor(ids))
    qsl = pc["qsl"].tolist()
    for i in range(n):
        rows = slice(qsl[i], qsl[i + 1])
        if i in ids:
            assert torch.equal(out[rows], full[rows])
        else:
            assert (out[rows] == 7.0).all(), "touched a row it was not asked for"


def test_token_pool_rows_read_in_place():
    """SGLang's shape: block size 1, one int32 row of slot ids per pool entry, requests
    naming their row (``table_rows``), bf16 pool, learned sinks."""
    case = dict(c=Contract(4, 1, 24), seqs=[(40, 1), (90, 7), (20, 20)], hkv=2, group=3, D=64, rot=64,
                neox=True, base=10000.0, learned=True, sw=None, seed=3)
    pc = build_paged_case(case)
    pool_rows = torch.full((6, pc["table"].shape[1]), 10 ** 6, dtype=torch.int32)  # unused rows: out of range
    which = torch.tensor([4, 0, 2])
    pool_rows[which] = pc["table"]
    want = run_oracle(case, pc)
    got = run_kernel(case, dict(pc, table=pool_rows), table_rows=which)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_harness_detects_stale_reads():
    """Without the policy the kernel reads every block, the stale NaN ones too: a
    passing property above therefore means the live-block walk never reads the gap."""
    case = dict(c=Contract(4, 16, 1), seqs=[(100, 3), (70, 40)], hkv=2, group=2, D=32, rot=32, neox=True,
                base=10000.0, learned=False, sw=None, seed=1)
    pc = build_paged_case(case)
    torch.testing.assert_close(run_kernel(case, pc).double(), run_oracle(case, pc), rtol=1e-4, atol=1e-4)
    assert torch.isnan(run_kernel(case, pc, policy=None, rope=None)).any()


def test_rotation_table_is_the_reference_rotation():
    policy = SinkPolicy(4, 96, 32)
    rope = RotaryParams.default(48, base=10000.0)
    table = rotation_table(policy, rope)
    assert table.shape == (policy.window_blocks + 1, 24, 2)
    x = torch.randn(1, 1, 48)
    for m in range(policy.window_blocks + 1):
        delta = torch.tensor([m * policy.block_size])
        c, s = table[m, :, 0], table[m, :, 1]
        x1, x2 = x[..., :24], x[..., 24:]
        assert torch.equal(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), rotate(x, delta, rope))
    assert rotation_table(policy, rope) is table  # one table per layer rotary


def test_reference_can_be_forced(monkeypatch):
    case = dict(c=Contract(4, 16, 2), seqs=[(120, 5)], hkv=1, group=2, D=32, rot=32, neox=False,
                base=100.0, learned=False, sw=None, seed=2)
    pc = build_paged_case(case)
    from streaming_sink import cpu_attention

    monkeypatch.setenv("STREAMING_SINK_CPU_KERNEL", "reference")
    cpu_attention.load.cache_clear()
    try:
        assert cpu_attention.load() is False
        torch.testing.assert_close(run_kernel(case, pc), run_ref(case, pc))
        monkeypatch.setenv("STREAMING_SINK_CPU_KERNEL", "fast")
        with pytest.raises(ValueError, match="STREAMING_SINK_CPU_KERNEL"):
            run_kernel(case, pc)
    finally:
        monkeypatch.delenv("STREAMING_SINK_CPU_KERNEL")
        cpu_attention.load.cache_clear()
    assert cpu_attention.load() is True


def test_reference_fallback_keeps_other_rows():
    """The fallback path (no compiler here) honours seq_ids and table_rows like the kernel."""
    from streaming_sink import cpu_attention

    case = dict(c=Contract(4, 8, 3), seqs=[(60, 1), (90, 9), (30, 30)], hkv=1, group=2, D=32, rot=32,
                neox=True, base=10000.0, learned=True, sw=None, seed=4)
    pc = build_paged_case(case)
    ids = torch.tensor([0, 2])
    want = torch.full_like(pc["q"], 7.0)
    run_kernel(case, pc, out=want, seq_ids=ids)
    got = torch.full_like(pc["q"], 7.0)
    c = case["c"]
    cpu_attention._reference(pc["q"], pc["k_cache"], pc["v_cache"], pc["table"], pc["qsl"].long(), pc["seq_lens"],
                             case["D"] ** -0.5, SinkPolicy(c.sink_tokens, c.window_blocks * c.block_size, c.block_size),
                             RotaryParams(pc["inv32"], case["rot"], case["neox"]), pc["sinks"], None, got, ids, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[pc["qsl"][1]:pc["qsl"][2]] == 7.0).all()


# ----------------------------------------------------------------------------
# Per-sequence sink lengths (issue 23): one batch, each sequence its own S
# ----------------------------------------------------------------------------
DEFAULT_S = 4  # the policy's own sink_tokens in these cases (the server default)


def build_mixed_case(seqs, *, bs=4, wb=2, hkv=1, group=2, D=32, rot=32, neox=True, learned=True, sw=None,
                     seed=0):
    """One step over sequences ``[(seq_len, q_len, S), ...]``: each built by the harness
    with its own Contract (positions written at its own pos(t), stale NaN ids in its own
    gap), then put in one shuffled cache and table. Returns (case, pc, contracts)."""
    parts = []
    for n, (L, q_len, S) in enumerate(seqs):
        case = dict(c=Contract(S, bs, wb), seqs=[(L, q_len)], hkv=hkv, group=group, D=D, rot=rot, neox=neox,
                    base=10000.0, learned=learned, sw=sw, seed=seed + n)
        parts.append(build_paged_case(case))
    width = max(p["table"].shape[1] for p in parts)
    tables, off = [], 0
    for p in parts:  # each part's blocks after the previous parts'; padding: the part's own stale id
        t = p["table"] + off
        tables.append(torch.cat([t, t[:, -1:].expand(1, width - t.shape[1])], dim=1))
        off += p["k_cache"].shape[0]
    q_lens = [len(p["seqs"][0]["queries"]) for p in parts]
    pc = dict(seqs=[p["seqs"][0] for p in parts], q=torch.cat([p["q"] for p in parts]),
              k_cache=torch.cat([p["k_cache"] for p in parts]), v_cache=torch.cat([p["v_cache"] for p in parts]),
              table=torch.cat(tables), qsl=torch.tensor([0] + q_lens).cumsum(0).to(torch.int32),
              seq_lens=torch.cat([p["seq_lens"] for p in parts]), inv32=parts[0]["inv32"],
              inv64=parts[0]["inv64"], sinks=parts[0]["sinks"])
    case = dict(c=Contract(DEFAULT_S, bs, wb), seqs=[(L, q) for L, q, _ in seqs], hkv=hkv, group=group, D=D,
                rot=rot, neox=neox, base=10000.0, learned=learned, sw=sw, seed=seed)
    sink_tokens = torch.tensor([S for *_, S in seqs], dtype=torch.int32)
    return case, pc, sink_tokens


def run_mixed_oracle(case, pc, sink_tokens):
    """The float64 oracle, each sequence under the contract with its own S."""
    c = case["c"]
    return torch.cat([oracle_attention(s["q"], s["k"], s["v"], contract=Contract(int(S), c.block_size, c.window_blocks),
                                       inv_freq=pc["inv64"], rotary_dim=case["rot"], neox=case["neox"],
                                       sinks=pc["sinks"], sliding_window=case["sw"], query_positions=s["queries"])
                      for s, S in zip(pc["seqs"], sink_tokens.tolist())])


# bs 4, Wb 2 (W = 8): S = 0, 6 (not a multiple of bs), 13 (> the window), 4 (the default), each with
# a decode below / across / past its own switch (dense_tokens 12, 20, 28, 16) and a prefill chunk.
MIXED_SEQS = [(40, 1, 0), (13, 5, 0), (21, 1, 6), (55, 9, 6), (29, 29, 13), (80, 1, 13), (31, 3, 13),
              (50, 3, 4), (10, 1, 4), (17, 1, 4)]


@pytest.mark.parametrize("variant", [dict(), dict(neox=False, rot=16, group=1, hkv=2, learned=False),
                                     dict(sw=6, seed=7), dict(bs=3, wb=3, group=4, seed=11)])
def test_per_seq_sinks_reference_and_kernel_match_oracle(variant):
    case, pc, S = build_mixed_case(MIXED_SEQS, **variant)
    want = run_mixed_oracle(case, pc, S)
    for fn in (paged_attention_ref, paged_attention_cpu):
        got = run_ref(case, pc, fn=fn, sink_tokens=S, max_sink_tokens=13)
        assert torch.isfinite(got).all(), f"{fn.__name__} read a stale (NaN) block"
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=fn.__name__)
    # The kernel in vLLM's CPU layout, int64 S, only some sequences (S indexed by sequence).
    got = run_kernel(case, pc, k_cache=dim_major(pc["k_cache"]), sink_tokens=S.long(), max_sink_tokens=13)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    out = torch.full_like(pc["q"], 7.0)
    ids = torch.tensor([1, 4, 7])
    run_kernel(case, pc, out=out, seq_ids=ids, sink_tokens=S, max_sink_tokens=13)
    qsl = pc["qsl"].tolist()
    for i in range(len(MIXED_SEQS)):
        rows = slice(qsl[i], qsl[i + 1])
        if i in ids:
            torch.testing.assert_close(out[rows].double(), want[rows], rtol=1e-4, atol=1e-4)
        else:
            assert (out[rows] == 7.0).all()


def test_per_seq_sinks_default_equals_policy():
    """A tensor holding the policy's own S for every sequence == sink_tokens=None, bit for bit."""
    case, pc, S = build_mixed_case([(L, q, DEFAULT_S) for L, q, _ in MIXED_SEQS], seed=3)
    for fn in (paged_attention_ref, paged_attention_cpu):
        assert torch.equal(run_ref(case, pc, fn=fn, sink_tokens=S), run_ref(case, pc, fn=fn))


def test_per_seq_sinks_refusals():
    case, pc, S = build_mixed_case(MIXED_SEQS[:3])
    for fn in (paged_attention_ref, paged_attention_cpu):
        with pytest.raises(ValueError, match="max_sink_tokens"):
            run_ref(case, pc, fn=fn, sink_tokens=S)  # 6 > the bound (policy's 4)
        with pytest.raises(ValueError, match="sink_tokens needs a policy"):
            run_ref(case, pc, fn=fn, sink_tokens=S, policy=None, rope=None)
        with pytest.raises(ValueError, match="int32/int64"):
            run_ref(case, pc, fn=fn, sink_tokens=S.float(), max_sink_tokens=13)


# ----------------------------------------------------------------------------
# fp8 caches (issue 22): e4m3 / e5m2 with vLLM's k/v scales
# ----------------------------------------------------------------------------
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# Scales keep the harness's values (|k| <~ 8) inside e4m3's range (448) after k / scale.
SCALES = [1.0, 0.05, 0.5]


def quantize(cache: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """What an engine stores: ``x / scale`` rounded to fp8 (the rounding mode does not
    matter here: kernel and reference read the same stored bytes)."""
    return (cache / scale).to(dtype)


def fp8_inputs(pc, dtype, k_scale, tensor_scales):
    ks, vs = k_scale, k_scale * 1.7
    k8, v8 = quantize(pc["k_cache"], dtype, ks), quantize(pc["v_cache"], dtype, vs)
    # The reference is fed the same stored values, dequantized as the API defines it.
    deq = dict(k_cache=k8.float() * ks, v_cache=v8.float() * vs)
    scales = dict(k_scale=torch.tensor([ks]), v_scale=torch.tensor(vs)) if tensor_scales else dict(k_scale=ks, v_scale=vs)
    return k8, v8, deq, scales


# Tolerance: kernel and reference compute in fp32 from identical dequantized values; the
# kernel folds k_scale into the query's scale and v_scale into the output (two extra fp32
# roundings, ~1e-7 relative) and sums in another order, so the fp32 kernel's 1e-4 per
# element (test_kernel_matches_oracle) holds; with bf16 q/out it is the one rounding of the
# output to bf16 (2^-8 relative), as in test_half_caches_match_reference.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_cases(), st.sampled_from(FP8), st.sampled_from(SCALES), st.booleans(), st.booleans())
def test_fp8_caches_match_reference(case, dtype, k_scale, tensor_scales, q_bf16):
    event(str(dtype))
    pc = build_paged_case(case)
    k8, v8, deq, scales = fp8_inputs(pc, dtype, k_scale, tensor_scales)
    q = pc["q"].to(torch.bfloat16) if q_bf16 else pc["q"]
    want = run_ref(case, dict(pc, q=q, **deq))
    got = run_kernel(case, pc, q=q, k_cache=dim_major(k8), v_cache=v8, **scales)  # vLLM's CPU layout
    assert got.dtype == q.dtype and torch.isfinite(got).all()
    tol = 2e-2 if q_bf16 else 1e-4
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # The reference's own fp8 path (dequantizing the blocks it gathers) is the same computation.
    torch.testing.assert_close(run_ref(case, pc, q=q, k_cache=k8, v_cache=v8, **scales), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_with_per_seq_sinks(dtype):
    """fp8 and per-sequence S together, against the reference fed the dequantized cache."""
    case, pc, S = build_mixed_case(MIXED_SEQS, seed=21)
    k8, v8, deq, scales = fp8_inputs(pc, dtype, 0.05, tensor_scales=True)
    want = run_ref(case, dict(pc, **deq), sink_tokens=S, max_sink_tokens=13)
    got = run_kernel(case, pc, k_cache=dim_major(k8), v_cache=v8, sink_tokens=S, max_sink_tokens=13, **scales)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The fp8 rounding is visible (the test would catch reading the cache as if it were exact).
    assert (run_mixed_oracle(case, pc, S) - got.double()).abs().max() > 1e-3


def test_fp8_refusals():
    case, pc, _ = build_mixed_case(MIXED_SEQS[:2])
    for fn in (paged_attention_ref, paged_attention_cpu):
        with pytest.raises(ValueError, match="k_scale/v_scale"):
            run_ref(case, pc, fn=fn, k_scale=0.5)  # a float32 cache is not scaled
