"""Per-request sink lengths (issue 23), engine-free: each request's rules are the
contract's with its own ``S`` (``oracle.Contract(S)``), elementwise over a batch whose
tokens carry different ``S``; the per-request field, the system turn, the salt, the flags.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import Contract
from streaming_sink import flags as sink_flags
from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.reference_attention import attended_keys
from streaming_sink.request_sinks import (
    FIELD, RequestSinkError, capped, request_sink_tokens, salted, system_turn_tokens)
from streaming_sink.step_split import split_step

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
block_sizes = st.one_of(st.sampled_from([1, 3, 16, 32]), st.integers(1, 20))
sinks = st.one_of(st.sampled_from([0, 1, 4, 16, 17, 40]), st.integers(0, 70))


@st.composite
def server_and_requests(draw):
    """A server policy (default S, window, block size) and a few requests' own S."""
    bs, wb = draw(block_sizes), draw(st.integers(1, 5))
    default = draw(sinks)
    own = draw(st.lists(sinks, min_size=1, max_size=5))
    return SinkPolicy(default, wb * bs, bs), own


def _horizon(p: SinkPolicy, S: int) -> int:
    return p.dense_tokens_of(S) + (p.window_blocks + 3) * p.block_size


@SETTINGS
@given(server_and_requests())
def test_with_sinks_is_the_contract_with_that_S(pr):
    p, own = pr
    for S in own:
        q, c = p.with_sinks(S), Contract(S, p.block_size, p.window_blocks)
        assert (q.window_tokens, q.block_size, q.sink_tokens) == (p.window_tokens, p.block_size, S)
        assert q.sink_blocks == c.sink_blocks == p.sink_blocks_of(S)
        assert q.dense_tokens == c.dense_tokens() == p.dense_tokens_of(S)
        for t in range(_horizon(p, S)):
            a = c.query(t)
            assert q.cache_position(t) == a.q_pos == p.cache_position(t, S)
            assert q.attended_keys(t) == a.keys
            assert q.live_blocks(t // p.block_size) == c.blocks_read(t)
        # the Sb + Wb + 1 bound a request's blocks keep (one query at a time)
        assert q.max_live_blocks(1) == c.sink_blocks + c.window_blocks + 1


@SETTINGS
@given(server_and_requests(), st.sampled_from([torch.int64, torch.int32]), st.data())
def test_tensor_rules_per_token_S(pr, dtype, data):
    """One batch, each token with its request's S: ``cache_position(t, S)`` and the
    per-sequence dense bound elementwise equal each request's own contract."""
    p, own = pr
    ts, ss = [], []
    for S in own:
        n = data.draw(st.integers(1, 3 * _horizon(p, S)), label="tokens")
        t0 = data.draw(st.integers(0, 2 * _horizon(p, S)), label="first position")
        ts += range(t0, t0 + n)
        ss += [S] * n
    t, s = torch.tensor(ts, dtype=dtype), torch.tensor(ss, dtype=dtype)
    want = [Contract(S, p.block_size, p.window_blocks).query(x).q_pos for x, S in zip(ts, ss)]
    got = p.cache_position(t, s)
    assert got.dtype == dtype and got.tolist() == want
    assert p.dense_tokens_of(s).tolist() == [Contract(S, p.block_size, p.window_blocks).dense_tokens()
                                             for S in ss]


@SETTINGS
@given(server_and_requests(), st.data())
def test_split_step_per_sequence_S(pr, data):
    """A sequence goes to the engine's own kernel iff every query of it is dense under
    its own S; the host shortcut (max length, smallest S) never contradicts that."""
    p, own = pr
    lens = [data.draw(st.integers(1, 2 * _horizon(p, S)), label="seq len") for S in own]
    q_lens = [data.draw(st.integers(1, n), label="q len") for n in lens]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    seq_lens, s = torch.tensor(lens), torch.tensor(own)
    split = split_step(p, seq_lens, qsl, max(lens), sink_tokens=s, min_sink_tokens=min(own))
    dense = [n <= p.with_sinks(S).dense_tokens for n, S in zip(lens, own)]
    for i, (n, S) in enumerate(zip(lens, own)):  # dense <=> every query's keys are [0, t]
        c = Contract(S, p.block_size, p.window_blocks)
        assert dense[i] == all(not c.is_streaming(t) for t in range(n - q_lens[i], n))
    if split.all_dense:
        assert all(dense)
    else:
        ids = [] if split.streaming_ids is None else split.streaming_ids.tolist()
        assert ids == [i for i, d in enumerate(dense) if not d]
        if split.dense_ids is not None:
            assert split.dense_ids.tolist() == [i for i, d in enumerate(dense) if d]


@SETTINGS
@given(server_and_requests(), st.data())
def test_attended_keys_mask_with_request_S(pr, data):
    """The kernels' test mask (reference_attention.attended_keys) with a request's policy
    is the token-level contract with that S."""
    p, own = pr
    S = own[0]
    q = p.with_sinks(S)
    c = Contract(S, p.block_size, p.window_blocks)
    seq_len = data.draw(st.integers(1, 2 * _horizon(p, S)))
    q_len = data.draw(st.integers(1, seq_len))
    mask = attended_keys(q, p.block_size, seq_len, q_len, None)
    want = set().union(*(c.query(t).keys for t in range(seq_len - q_len, seq_len)))
    assert set(torch.nonzero(mask).flatten().tolist()) == want


@SETTINGS
@given(st.integers(1, 600), sinks, st.integers(0, 200), block_sizes)
def test_resolve_fits_every_request_up_to_the_cap(table, S, extra, bs):
    cap = S + extra
    try:
        p = SinkPolicy.resolve(S, None, bs, table, max_sink_tokens=cap)
    except PolicyConfigError as e:
        assert SinkPolicy.largest_window(table, cap, bs) <= 0
        assert ("--max-sink-tokens" if extra else "--sink-tokens") in str(e)
        return
    assert p.sink_tokens == S and p.window_tokens == SinkPolicy.largest_window(table, cap, bs)
    for s in {0, S, cap, (S + cap) // 2}:
        p.with_sinks(s).check_rotary_table(table)  # every request's positions fit
    with pytest.raises(PolicyConfigError):  # and the window is the largest that does
        p.with_sinks(cap).__class__(cap, p.window_tokens + bs, bs).check_rotary_table(table)
    # an explicit window that fits the default S but not the cap: refused naming both flags
    if extra and SinkPolicy.largest_window(table, S, bs) > p.window_tokens:
        w = SinkPolicy.largest_window(table, S, bs)
        with pytest.raises(PolicyConfigError, match="--max-sink-tokens.*--sink-window"):
            SinkPolicy.resolve(S, w, bs, table, max_sink_tokens=cap)


def test_request_field_values():
    assert request_sink_tokens(None, 4, 64) == 4
    assert request_sink_tokens(0, 4, 64) == 0
    assert request_sink_tokens(64, 4, 64) == 64
    for bad, words in ((-1, ">= 0"), (65, "--max-sink-tokens 64"), ("8", "integer"), (8.0, "integer"),
                       (True, "integer"), ([8], "integer")):
        with pytest.raises(RequestSinkError, match=words) as e:
            request_sink_tokens(bad, 4, 64)
        assert FIELD in str(e.value) and "\n" not in str(e.value)
    assert issubclass(RequestSinkError, ValueError)
    assert capped(2000, 1024) == 1024 and capped(10, 1024) == 10


def test_system_turn_is_the_common_prefix():
    system = [1, 50, 51, 52, 2, 10]  # <s> <|system|> ... <|end|> \n
    prompt = system + [60, 61, 2, 10, 70]
    assert system_turn_tokens(prompt, system) == len(system)
    assert system_turn_tokens(prompt[:3], system) == 3  # a prompt shorter than the system turn
    assert system_turn_tokens([9, *prompt], system) == 0
    assert system_turn_tokens(prompt, []) == 0


def test_salt_folds_S_only_off_the_default():
    assert salted(None, 4, 4) is None and salted("abc", 4, 4) == "abc"
    a, b = salted(None, 8, 4), salted(None, 9, 4)
    assert a and b and a != b and salted("abc", 8, 4) not in (a, "abc")
    assert salted("abc", 8, 4) == salted("abc", 8, 4)  # a session's turns keep hitting


def test_flags_system_mode_and_cap():
    chk = sink_flags.check_flags
    o = chk("streaming-sink", None, None)
    assert (o["sink_tokens"], o["max_sink_tokens"], o["sink_mode"]) == (4, 4, "number")
    o = chk("streaming-sink", "system", 128)
    assert (o["sink_tokens"], o["max_sink_tokens"], o["sink_mode"]) == (4, 1024, "system")
    o = chk("streaming-sink", "system:0", None, 300)
    assert (o["sink_tokens"], o["max_sink_tokens"], o["sink_mode"]) == (0, 300, "system")
    assert sink_flags.system_mode(o) and not sink_flags.system_mode(chk("streaming-sink", 8, None))
    o = chk("streaming-sink", "16", None, 64)
    assert (o["sink_tokens"], o["max_sink_tokens"]) == (16, 64)
    # the settings dict round trip: each process re-checks what it received
    for opts in (chk("streaming-sink", "system:8", 64, 100), chk("streaming-sink", 2, None, 5)):
        again = chk(**{f: opts[f] for f in sink_flags.FLAGS}, sink_mode=opts["sink_mode"])
        assert again == opts
        settled = sink_flags.resolved_settings(opts, SinkPolicy(opts["sink_tokens"], 64, 16))
        assert sink_flags.policy_from_settings(settled).sink_tokens == opts["sink_tokens"]
        assert sink_flags.max_sink_tokens(settled) == opts["max_sink_tokens"]
        # the bounds both adapters quote are the widest request's: S at the cap
        largest = sink_flags.largest_policy_from_settings(settled)
        assert (largest.sink_tokens, largest.window_tokens, largest.block_size) == (opts["max_sink_tokens"], 64, 16)
    assert sink_flags.largest_policy_from_settings(None) is None
    for args, words in ((("streaming-sink", "sys", None), "--sink-tokens"),
                        (("streaming-sink", "system:-1", None), "--sink-tokens"),
                        (("streaming-sink", 8, None, 4), "--max-sink-tokens 4 is below --sink-tokens 8"),
                        (("streaming-sink", 8, None, -1), "--max-sink-tokens"),
                        (("none", None, None, 64), "--max-sink-tokens")):
        with pytest.raises(PolicyConfigError, match=words):
            chk(*args)
    assert sink_flags.flags_given({"max_sink_tokens": 8})


def test_cli_parses_system_mode():
    parser = argparse.ArgumentParser()
    sink_flags.add_flags(parser, "vllm")
    a = parser.parse_args(["--kv-policy", "streaming-sink", "--sink-tokens", "system:6",
                           "--max-sink-tokens", "512"])
    assert (a.sink_tokens, a.max_sink_tokens) == ("system:6", 512)
    assert parser.parse_args(["--sink-tokens", "12"]).sink_tokens == 12
    with pytest.raises(SystemExit):
        parser.parse_args(["--sink-tokens", "systemic"])
    assert "system" in parser.format_help() and "--max-sink-tokens" in parser.format_help()
