"""SGLang's radix (prefix) cache with kv_policy="streaming-sink" (sglang_sink/radix.py).

Tiny random Llama, context 128. Every history here starts with one 48-token system
prompt, which is the sink (``sink_tokens=48``), and the window is 64 tokens, so a
request resuming after a cached prefix ``h`` needs ``[0, 48)`` and ``[h - 64, h)``
from the cache (the dense regime ends at token 112). Each turn of a session is the
previous prompt + the previous greedy reply + a new message; a session runs 16x the
context. Outputs are checked against the same prompts on an engine with the radix
cache off (policy on) and against the oracle fed the whole history.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONTEXT
from oracle import OracleLlama
from sglang_helpers import CHUNK, TOL, Trace, check_oracle, decoded, engine_args, flush, random_ids, trace_path

from streaming_sink.policy import SinkPolicy

SYS, W = 48, 64  # the system prompt is the sink
POLICY = SinkPolicy(SYS, W, 1)
BOUND = POLICY.max_live_blocks(CHUNK)  # a request's own slots: sinks + window + current + a chunk
SYSTEM = random_ids(SYS, seed=999)
TURNS, MESSAGE, REPLY = 10, 150, 60


def args(model, **kw):
    return engine_args(model, sink_tokens=SYS, sink_window=W, max_total_tokens=1536, **kw)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return Trace(trace_path(tmp_path_factory))


@pytest.fixture(scope="module")
def engine(tiny_llama_128, trace):
    import sglang

    eng = sglang.Engine(**args(tiny_llama_128))  # radix cache on: SGLang's default
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def oracle(tiny_llama_128):
    return OracleLlama(tiny_llama_128, sink_tokens=SYS, window_tokens=W, block_size=1)


def run(engine, prompts, n=REPLY):
    """Greedy replies: (tokens, logprobs, cached prompt tokens) per prompt."""
    return decoded(engine.generate(input_ids=prompts, sampling_params={
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}, return_logprob=True))


def idle_probe(engine, trace) -> dict:
    """A 2-token request: its first record shows the pool before its own allocation."""
    trace.clear()
    run(engine, [[5, 6]], 1)
    return trace.records()[0]


@pytest.fixture(scope="module")
def session(engine, trace):
    """One 10-turn session; the prompts, replies and cache hits of every turn."""
    trace.clear()
    prompt, turns = SYSTEM + random_ids(MESSAGE, seed=1), []
    for turn in range(TURNS):
        [(gen, lp, cached)] = run(engine, [prompt])
        turns.append((prompt, gen, lp, cached))
        prompt = prompt + gen + random_ids(MESSAGE, seed=100 + turn)
    return turns, trace.records()


def test_session_turns_cost_their_new_tokens(session):
    turns, _ = session
    total = len(turns[-1][0]) + REPLY
    assert total >= 16 * CONTEXT
    for i, (prompt, _, _, cached) in enumerate(turns):
        print(f"turn {i}: prompt {len(prompt)}, served from cache {cached}")
        if i:  # everything but the new message and the last reply token (its KV was never computed)
            assert cached == len(turns[i - 1][0]) + REPLY - 1
    assert turns[0][3] == 0


def test_session_matches_oracle(session, oracle):
    turns, _ = session
    # The whole history once through the oracle: every turn's prompt is a prefix of it.
    history = turns[-1][0] + turns[-1][1]
    lp = oracle.logprobs(history)
    worst = 0.0
    for i, (prompt, gen, got, _) in enumerate(turns):
        assert history[:len(prompt) + len(gen)] == prompt + gen
        want = lp[len(prompt) - 1:len(prompt) - 1 + len(gen)].gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        worst = max(worst, (got - want).abs().max().item())
        assert worst < TOL, f"turn {i}: max |engine - oracle| {worst:.3g}"
        assert torch.equal(lp[len(prompt) - 1:len(prompt) - 1 + len(gen)].argmax(1), torch.tensor(gen))
    print(f"{TURNS} turns, {len(history)} tokens: max |radix engine - oracle| = {worst:.3g}")


def test_session_slots_bounded_and_accounted(session):
    _, records = session
    own = [v for r in records for v in r["step"].values()]
    assert max(own) <= BOUND, f"a request held {max(own)} slots of its own, bound {BOUND}"
    # What SGLang's allocator holds is the requests' own slots plus the tree's live ones:
    # tree-owned slots are never freed by a request, and nothing else is held.
    assert all(r["used"] == sum(r["step"].values()) + r["tree"] for r in records)
    # The tree keeps live slots only: sinks and windows, not each turn's whole history.
    assert max(r["tree"] for r in records) < TURNS * (SYS + W + REPLY + MESSAGE)


def test_divergence_in_the_gap_or_window_gets_no_wrong_hit(session, engine, oracle):
    turns, _ = session
    prompt, gen = turns[-1][0], turns[-1][1]
    cached_path = prompt + gen
    end = len(cached_path) - 1  # cached tokens of the last turn
    cases = {"in the recycled gap": end - 5 * W, "inside the window": end - W // 2,
             "at the window's start": end - W, "just past the dense head": SYS + W + 7}
    prompts = [cached_path[:k] + random_ids(40, seed=k) for k in cases.values()]
    for (what, k), p, (g, got, cached) in zip(cases.items(), prompts, run(engine, prompts, 24)):
        print(f"diverging {what} (token {k}): served from cache {cached}")
        assert cached <= k
        check_oracle(oracle, p, g, got, what)


def test_concurrent_sessions_share_the_system_prompt(engine, trace, oracle):
    trace.clear()
    n, turns = 3, 3
    prompts = [SYSTEM + random_ids(90 + 40 * s, seed=500 + s) for s in range(n)]
    hits = []
    for turn in range(turns):
        outs = run(engine, prompts, 50)
        for s, (p, (g, got, cached)) in enumerate(zip(prompts, outs)):
            check_oracle(oracle, p, g, got, f"session {s} turn {turn}")
            hits.append(cached)
            prompts[s] = p + g + random_ids(30, seed=600 + 10 * turn + s)
    print(f"cache hits per request: {hits}")
    assert all(c >= SYS for c in hits)  # the system prompt's slots are shared, never recomputed
    records = trace.records()
    assert max(v for r in records for v in r["step"].values()) <= BOUND
    # Steps of all sessions together (an extend step lists only its own requests).
    together = [r for r in records if len(r["step"]) == n]
    assert len(together) > turns * 40
    bad = [r for r in together if r["used"] != sum(r["step"].values()) + r["tree"]]
    assert not bad, bad[:3]
    rec = idle_probe(engine, trace)
    assert rec["used"] == rec["tree"]  # idle: the tree holds everything still in use


def test_eviction_under_pressure_then_resume(session, engine, trace, oracle):
    """Fill the 1536-slot pool with finished requests' live KV until SGLang evicts from
    the tree; then the session resumes from whatever of its path is still valid."""
    trace.clear()
    for batch in range(2):
        run(engine, [random_ids(150, seed=3000 + 8 * batch + i) for i in range(8)], 20)
    tree = [r["tree"] for r in trace.records()]
    assert any(b < a for a, b in zip(tree, tree[1:])), "no eviction happened"
    rec = idle_probe(engine, trace)
    assert rec["used"] == rec["tree"]
    turns, _ = session
    prompt = turns[-1][0] + turns[-1][1] + random_ids(30, seed=4000)
    [(g, got, cached)] = run(engine, [prompt], 24)
    print(f"after eviction, the session resumes with {cached} cached tokens; tree peak {max(tree)}")
    check_oracle(oracle, prompt, g, got, "resumed after eviction")


def test_abort_and_flush_return_every_slot(engine, trace):
    trace.clear()
    rid = "radix-abort"
    prompt = SYSTEM + random_ids(200, seed=77)
    stream = engine.generate(input_ids=prompt, rid=rid, stream=True, sampling_params={
        "max_new_tokens": 8 * CONTEXT, "temperature": 0, "ignore_eos": True})
    last = None
    for chunk in stream:
        last = chunk
        if chunk["meta_info"]["completion_tokens"] >= 2 * CONTEXT:
            engine.tokenizer_manager.abort_request(rid)
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert max(v for r in trace.records() for v in r["step"].values()) <= BOUND
    rec = idle_probe(engine, trace)
    assert rec["used"] == rec["tree"]
    flush(engine)
    assert idle_probe(engine, trace)["used"] == 0


def test_session_matches_radix_off(session, tiny_llama_128, engine):
    """Last: SGLang's Engine.shutdown() ends every child process of this one, so the
    radix-on engine goes first."""
    import sglang

    turns, _ = session
    engine.shutdown()
    off = sglang.Engine(**args(tiny_llama_128, disable_radix_cache=True))
    try:
        for i, (prompt, gen, got, _) in enumerate(turns):
            [(gen_off, lp_off, cached)] = run(off, [prompt])
            assert cached == 0
            assert gen_off == gen, f"turn {i}: radix on and off disagree"
            assert (lp_off - got).abs().max().item() < TOL
    finally:
        off.shutdown()
