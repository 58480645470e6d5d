"""Hypothesis properties of the engine-free core against the independent oracle.

(a) ``SinkPolicy`` rules against ``oracle.Contract`` (the contract's text).
(b) ``paged_attention_ref`` over a paged cache built the way an engine builds it
    (keys written rotated at their cache position when written, shuffled physical
    blocks, stale ids in the freed gap pointing at NaN blocks) against
    ``oracle_attention`` (pre-RoPE, token at a time, float64).
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from oracle import Contract, oracle_attention, rope
from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink import reference_attention
from streaming_sink.reference_attention import paged_attention_ref
from streaming_sink.rope import RotaryParams

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

block_sizes = st.one_of(st.sampled_from([1, 2, 3, 16, 32]), st.integers(1, 40))
sinks_tokens = st.one_of(st.sampled_from([0, 1, 4, 16, 20]), st.integers(0, 40))


@st.composite
def policies(draw):
    S, bs, wb = draw(sinks_tokens), draw(block_sizes), draw(st.integers(1, 6))
    return SinkPolicy(S, wb * bs, bs), Contract(S, bs, wb)


def _horizon(c: Contract) -> int:
    """Queries up to here cover dense, the switch, and a few streaming windows."""
    return c.dense_tokens() + (c.window_blocks + 3) * c.block_size


# ============================================================================
# (a) policy rules
# ============================================================================
@SETTINGS
@given(policies())
def test_sizes(pc):
    p, c = pc
    assert p.sink_blocks == c.sink_blocks == math.ceil(c.sink_tokens / c.block_size)
    assert p.window_blocks == c.window_blocks
    assert p.dense_tokens == c.dense_tokens()
    for t in range(_horizon(c)):
        assert bool(p.is_streaming(t // c.block_size)) == c.is_streaming(t)
        assert (t < p.dense_tokens) == (not c.is_streaming(t))


@SETTINGS
@given(policies())
def test_positions_keys_blocks_int(pc):
    p, c = pc
    bs = c.block_size
    for t in range(_horizon(c)):
        a = c.query(t)
        j = t // bs
        assert p.cache_position(t) == a.q_pos
        assert p.attended_keys(t) == a.keys
        assert p.live_blocks(j) == c.blocks_read(t)
        if a.streaming:
            assert p.window_start(j) == c.window_start(t)
            assert p.first_window_block(j) == c.window_start(t) // bs
        else:
            assert p.window_start(j) == c.sink_tokens  # the "dense ws = S" convention
        # position remap: a key written at pos(k) and seen `delta` lower sits where
        # the contract puts it (sink keys: delta 0)
        for k, kp in zip(a.keys, a.key_pos):
            jk = k // bs
            delta = 0 if jk < c.sink_blocks else p.query_delta(j, jk)
            assert a.streaming or delta == 0
            assert c.write_position(k) - delta == kp, (t, k)


@SETTINGS
@given(policies(), st.sampled_from([torch.int64, torch.int32]))
def test_positions_tensors(pc, dtype):
    p, c = pc
    bs = c.block_size
    t = torch.arange(_horizon(c), dtype=dtype)
    j = t // bs
    want_pos = [c.query(int(x)).q_pos for x in t]
    got = p.cache_position(t)
    assert isinstance(got, torch.Tensor) and got.tolist() == want_pos
    assert p.is_streaming(j).tolist() == [c.is_streaming(int(x)) for x in t]
    assert p.window_start(j).tolist() == [p.window_start(int(x)) for x in j]
    assert p.first_window_block(j).tolist() == [p.first_window_block(int(x)) for x in j]
    jq = int(j[-1])
    jk = torch.arange(p.first_window_block(jq), jq + 1, dtype=dtype)
    assert p.query_delta(jq, jk).tolist() == [p.query_delta(jq, int(x)) for x in jk]
    assert p.query_delta(torch.tensor(jq), jk).tolist() == [p.query_delta(jq, int(x)) for x in jk]


@SETTINGS
@given(policies())
def test_max_position_and_rotary_table(pc):
    p, c = pc
    used = 0
    for t in range(_horizon(c)):
        a = c.query(t)
        used = max(used, a.q_pos, max(a.key_pos), c.write_position(t))
    assert p.max_position == used == (c.sink_blocks + c.window_blocks + 1) * c.block_size - 1
    p.check_rotary_table(used + 1)
    with pytest.raises(PolicyConfigError, match="--sink-window"):
        p.check_rotary_table(used)


@SETTINGS
@given(st.integers(1, 600), sinks_tokens, block_sizes)
def test_largest_window(table, S, bs):
    w = SinkPolicy.largest_window(table, S, bs)
    assert w >= 0 and w % bs == 0
    if w > 0:
        SinkPolicy(S, w, bs).check_rotary_table(table)  # fits ...
        with pytest.raises(PolicyConfigError):  # ... and is the largest that fits
            SinkPolicy(S, w + bs, bs).check_rotary_table(table)
    else:
        with pytest.raises(PolicyConfigError):
            SinkPolicy(S, bs, bs).check_rotary_table(table)


@SETTINGS
@given(policies(), st.data())
def test_freeable_prefix_blocks(pc, data):
    p, c = pc
    bs = c.block_size
    n = data.draw(st.integers(0, _horizon(c)), label="num_computed_tokens")
    freed = set(p.freeable_prefix_blocks(n))
    later = range(n, n + (c.sink_blocks + c.window_blocks + 3) * bs)
    read_later = set().union(*(c.blocks_read(t) for t in later))
    assert not freed & read_later  # safety: nothing a later query reads
    assert all(b < n // bs for b in freed)  # never a block still being written
    # completeness: every old block no later query reads goes back to the pool
    assert freed == {b for b in range(n // bs) if b not in read_later}


@SETTINGS
@given(policies(), st.data())
def test_max_live_blocks_bounds_a_chunk(pc, data):
    p, c = pc
    start = data.draw(st.integers(0, _horizon(c)), label="chunk start")
    size = data.draw(st.integers(1, 4 * c.block_size + 3), label="chunk size")
    live = set().union(*(c.blocks_read(t) for t in range(start, start + size)))
    assert len(live) <= p.max_live_blocks(size)
    assert p.max_live_blocks(1) == c.sink_blocks + c.window_blocks + 1


@SETTINGS
@given(policies(), st.data())
def test_longest_hit_is_the_longest_resumable_prefix(pc, data):
    """A request resumed at block h reads, before h, exactly ``hit_blocks(h)``
    (the contract's blocks for query block h); ``longest_hit`` is the largest h
    whose blocks are all cached, whatever else (the gap) was evicted."""
    p, c = pc
    bs = c.block_size
    n = data.draw(st.integers(0, _horizon(c) // bs + 4), label="prompt blocks")
    cached = data.draw(st.sets(st.integers(0, max(n - 1, 0))), label="cached blocks")
    for h in range(n + 1):
        assert set(p.hit_blocks(h)) == set(c.blocks_read(h * bs)) - {h}
    probed = []
    got = p.longest_hit(n, lambda b: probed.append(b) or b in cached)
    assert got == max(h for h in range(n + 1) if set(p.hit_blocks(h)) <= cached)
    assert len(probed) == len(set(probed)) and all(0 <= b < n for b in probed)


@SETTINGS
@given(st.integers(0, 12), st.integers(1, 12), st.data())
def test_sglang_token_rule_is_the_block_rule(S, W, data):
    """SGLang's radix match (tokens = blocks of 1, vectorised over tombstones) resumes
    where ``SinkPolicy.longest_hit`` says, for any pattern of freed slots."""
    from sglang_sink.radix import TOMBSTONE, longest_valid_prefix

    p = SinkPolicy(S, W, 1)
    live = data.draw(st.lists(st.booleans(), max_size=3 * (S + W) + 5), label="live slots")
    values = torch.tensor([7 if x else TOMBSTONE for x in live], dtype=torch.int64)
    assert longest_valid_prefix(values, p) == p.longest_hit(len(live), lambda b: live[b])


@given(st.integers(-50, -1), block_sizes)
@settings(max_examples=20, deadline=None)
def test_config_errors(neg, bs):
    with pytest.raises(PolicyConfigError, match="--sink-tokens"):
        SinkPolicy(neg, bs, bs)
    for w in (0, -bs):
        with pytest.raises(PolicyConfigError, match="--sink-window"):
            SinkPolicy(4, w, bs)
    if bs > 1:
        with pytest.raises(PolicyConfigError, match="--sink-window"):
            SinkPolicy(4, bs + 1, bs)
    with pytest.raises(PolicyConfigError):
        SinkPolicy(4, 16, 0)
    assert issubclass(PolicyConfigError, ValueError)


@given(block_sizes, st.integers(1, 6), st.integers(1, 400))
@settings(max_examples=40, deadline=None)
def test_layer_window_check(bs, wb, sw):
    """A layer's own sliding window must fit the policy's window: sw <= W + 1
    (every query sees at least W window tokens behind it)."""
    p = SinkPolicy(4, wb * bs, bs)
    p.check_layer_window(None)
    if sw <= p.window_tokens + 1:
        p.check_layer_window(sw)
        # the layer's keys [t - sw + 1, t] are inside the live window of every streaming query
        for t in range(p.dense_tokens, p.dense_tokens + 3 * bs):
            assert t - sw + 1 >= p.window_start(t // bs)
    else:
        need = math.ceil((sw - 1) / bs) * bs
        with pytest.raises(PolicyConfigError, match=f"--sink-window >= {need}"):
            p.check_layer_window(sw, "layer x")
        SinkPolicy(4, need, bs).check_layer_window(sw)


# ============================================================================
# (b) paged reference attention vs the oracle
# ============================================================================
@st.composite
def attention_cases(draw):
    off = draw(st.integers(0, 9)) == 0  # ~10%: policy off, plain causal
    S = draw(st.sampled_from([0, 1, 4, 16, 20]))
    bs = draw(st.sampled_from([1, 16, 32, 2, 3, 5, 8]))
    wb = draw(st.integers(1, 4))
    c = Contract(None if off else S, bs, wb)
    dense = (math.ceil(S / bs) + wb + 1) * bs
    nseq = draw(st.integers(1, 3))
    seqs = []
    for _ in range(nseq):  # lengths around the dense -> streaming switch
        L = max(1, dense + draw(st.integers(-2 * bs, (wb + 3) * bs)))
        q_len = draw(st.one_of(st.just(1), st.integers(1, min(L, 4 * bs + 1)), st.just(L)))
        seqs.append((L, q_len))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([32, 64]))
    rot = draw(st.sampled_from([D, D, D // 2, 16]))
    sw = draw(st.one_of(st.none(), st.none(), st.integers(1, wb * bs + 1)))  # layer window <= W + 1
    return dict(c=c, seqs=seqs, hkv=hkv, group=group, D=D, rot=rot, neox=draw(st.booleans()),
                base=draw(st.sampled_from([10000.0, 100.0])), learned=draw(st.booleans()), sw=sw,
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _blocks_needed(c: Contract, t: int, sw) -> set[int]:
    keys = c.query(t).keys
    if sw is not None:
        keys = [k for k in keys if t - k < sw]
    return {k // c.block_size for k in keys}


def build_paged_case(case):
    """An engine's view of one step: rotated q rows, a shuffled paged cache whose
    non-needed logical blocks point at NaN blocks, plus the oracle's pre-RoPE data."""
    c, D, hkv = case["c"], case["D"], case["hkv"]
    hq, bs = hkv * case["group"], c.block_size
    g = torch.Generator().manual_seed(case["seed"])
    inv32 = (1.0 / case["base"] ** (torch.arange(0, case["rot"], 2).float() / case["rot"])).float()
    inv64 = inv32.double()
    seqs = []
    for L, q_len in case["seqs"]:
        q = torch.randn(L, hq, D, generator=g, dtype=torch.float64) * 1.5
        k = torch.randn(L, hkv, D, generator=g, dtype=torch.float64) * 1.5
        v = torch.randn(L, hkv, D, generator=g, dtype=torch.float64)
        wpos = torch.tensor([c.write_position(t) for t in range(L)])  # pos(t) as of when written
        k_rot = rope(k, wpos, inv64, case["rot"], case["neox"]).float()
        queries = list(range(L - q_len, L))
        q_rot = rope(q[queries], wpos[queries], inv64, case["rot"], case["neox"]).float()
        needed = set().union(*(_blocks_needed(c, t, case["sw"]) for t in queries))
        seqs.append(dict(L=L, q=q, k=k, v=v, k_rot=k_rot, q_rot=q_rot, queries=queries, needed=needed))

    n_live = sum(len(s["needed"]) for s in seqs)
    n_nan = 2
    n_phys = n_live + n_nan + 3  # + 3 unused garbage blocks
    perm = torch.randperm(n_phys, generator=g).tolist()
    nan_ids, free_ids = perm[:n_nan], perm[n_nan:]
    k_cache = torch.randn(n_phys, bs, hkv, D, generator=g) * 100  # finite garbage everywhere ...
    v_cache = torch.randn(n_phys, bs, hkv, D, generator=g) * 100
    k_cache[nan_ids] = float("nan")  # ... and NaN in the stale blocks
    v_cache[nan_ids] = float("nan")
    width = max(math.ceil(s["L"] / bs) for s in seqs) + 2
    table = torch.empty(len(seqs), width, dtype=torch.int32)
    for i, s in enumerate(seqs):
        for b in range(width):
            if b in s["needed"]:
                pid = free_ids.pop()
                lo, hi = b * bs, min((b + 1) * bs, s["L"])
                k_cache[pid, : hi - lo] = s["k_rot"][lo:hi]
                v_cache[pid, : hi - lo] = s["v"][lo:hi].float()
            else:  # freed gap, future, or padding: a stale id
                pid = nan_ids[int(torch.randint(n_nan, (1,), generator=g))]
            table[i, b] = pid
    q_lens = [len(s["queries"]) for s in seqs]
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    sinks = torch.randn(hq, generator=g) * 2 if case["learned"] else None
    return dict(seqs=seqs, q=torch.cat([s["q_rot"] for s in seqs]), k_cache=k_cache, v_cache=v_cache,
                table=table, qsl=qsl, seq_lens=torch.tensor([s["L"] for s in seqs], dtype=torch.int32),
                inv32=inv32, inv64=inv64, sinks=sinks)


def run_ref(case, pc, fn=paged_attention_ref, q=None, k_cache=None, v_cache=None, **overrides):
    """``fn`` (the reference, or a kernel of the same API) on the case; q / caches / keywords overridable."""
    c = case["c"]
    policy = None if c.off else SinkPolicy(c.sink_tokens, c.window_blocks * c.block_size, c.block_size)
    rope_p = RotaryParams(pc["inv32"], case["rot"], case["neox"])
    kw = dict(scale=case["D"] ** -0.5, policy=policy, rope=rope_p, sinks=pc["sinks"], sliding_window=case["sw"])
    kw.update(overrides)
    return fn(pc["q"] if q is None else q, pc["k_cache"] if k_cache is None else k_cache,
              pc["v_cache"] if v_cache is None else v_cache, pc["table"], pc["qsl"], pc["seq_lens"], **kw)


def run_oracle(case, pc):
    outs = [oracle_attention(s["q"], s["k"], s["v"], contract=case["c"], inv_freq=pc["inv64"],
                             rotary_dim=case["rot"], neox=case["neox"], sinks=pc["sinks"],
                             sliding_window=case["sw"], query_positions=s["queries"]) for s in pc["seqs"]]
    return torch.cat(outs)


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_cases())
def test_paged_reference_matches_oracle(case):
    c = case["c"]
    for L, q_len in case["seqs"]:
        first, last = c.is_streaming(L - q_len), c.is_streaming(L - 1)
        event("policy off" if c.off else "dense only" if not last else
              "streaming only" if first else "chunk crosses the switch")
        event(f"q_len: {'1' if q_len == 1 else 'whole seq' if q_len == L else 'partial chunk'}")
    pc = build_paged_case(case)
    got = run_ref(case, pc)
    want = run_oracle(case, pc)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all(), "read a stale (NaN) block"
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    with mock.patch.object(reference_attention, "_PASS_ELEMENTS", 1):  # one query group per pass
        torch.testing.assert_close(run_ref(case, pc).double(), want, rtol=1e-4, atol=1e-4)


@st.composite
def decode_batches(draw):
    """Several decode rows (q_len 1) in one step: the reference's batched path."""
    case = draw(attention_cases().filter(lambda c: not c["c"].off))
    c, bs = case["c"], case["c"].block_size
    dense = c.dense_tokens()
    n = draw(st.integers(2, 6))
    case["seqs"] = [(max(1, dense + draw(st.integers(-2 * bs, (c.window_blocks + 3) * bs))), 1) for _ in range(n)]
    return case


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(decode_batches())
def test_batched_decode_matches_oracle(case):
    c = case["c"]
    event("mixed regimes" if len({c.is_streaming(L - 1) for L, _ in case["seqs"]}) > 1 else "one regime")
    pc = build_paged_case(case)
    got = run_ref(case, pc)
    assert torch.isfinite(got).all(), "read a stale (NaN) block"
    torch.testing.assert_close(got.double(), run_oracle(case, pc), rtol=1e-4, atol=1e-4)


def test_harness_detects_stale_reads():
    """The NaN blocks do poison a kernel that reads the gap (here: the policy-free
    reference reads every block), so a passing property means the gap is never read."""
    case = dict(c=Contract(4, 16, 1), seqs=[(100, 3), (70, 40)], hkv=2, group=2, D=32, rot=32, neox=True,
                base=10000.0, learned=False, sw=None, seed=1)
    pc = build_paged_case(case)
    good = run_ref(case, pc)
    torch.testing.assert_close(good.double(), run_oracle(case, pc), rtol=1e-4, atol=1e-4)
    bad = run_ref(case, pc, policy=None, rope=None)
    assert torch.isnan(bad).any()
