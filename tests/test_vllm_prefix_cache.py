"""Prefix caching under the policy: endless multi-turn sessions on the real vLLM engine.

Each turn of a chat is a new request whose prompt is the whole history; with
prefix caching the engine resumes from the cached sink + window blocks of the
previous turn and computes only what is new. Tiny random Llama (context 256),
block 32, W=128, and a 90-token system prompt as the sink (--sink-tokens 90:
3 sink blocks, the last one shared with the first user tokens). Every output is
checked against the oracle fed the whole history, and against the same prompt
on an engine with prefix caching off.
"""

from __future__ import annotations

import pytest
import torch

from oracle import OracleLlama, check_greedy
from vllm_helpers import BS, W, SamplingParams, free_blocks, greedy, kv_manager, live_blocks, \
    make_llm, output_logprobs, random_ids

from streaming_sink.policy import SinkPolicy

CONTEXT = 256
SYSTEM_LEN = 90
POLICY = SinkPolicy(SYSTEM_LEN, W, BS)  # dense regime: 256 tokens, RoPE positions <= 255
CHUNK = 200  # max_num_batched_tokens of make_llm
TOL = 2e-4
SYSTEM = random_ids(SYSTEM_LEN, seed=500)
REPLY = 60
MESSAGE = 350  # tokens of each new user message


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = make_llm(tiny_llama, sink_tokens=SYSTEM_LEN)  # prefix caching: vLLM's default, on
    yield engine
    del engine


@pytest.fixture(scope="module")
def nocache(tiny_llama, llm):
    engine = make_llm(tiny_llama, sink_tokens=SYSTEM_LEN, enable_prefix_caching=False)
    yield engine
    del engine


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    return OracleLlama(tiny_llama, sink_tokens=SYSTEM_LEN, window_tokens=W, block_size=BS)


def _same_as(gen, lps, ref_gen, ref_lps, oracle_lp, start, what):
    """Caching on vs off: the same tokens, up to a float near-tie (then stop there)."""
    n = next((i for i, (a, b) in enumerate(zip(gen, ref_gen)) if a != b), len(gen))
    if n < len(gen):
        top2 = oracle_lp[start - 1 + n].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-3, f"{what}: caching on/off differ at token {n}"
    assert (lps[:n] - ref_lps[:n]).abs().max().item() < TOL, what


@pytest.fixture(scope="module")
def session(llm, nocache):
    """Ten turns of one chat, each the whole history plus a new message; 16x the context."""
    history = SYSTEM + random_ids(200, seed=1)
    turns = []
    for turn in range(10):
        gen, lps, cached = greedy(llm, history, REPLY)
        ref = greedy(nocache, history, REPLY)
        turns.append(dict(start=len(history), gen=gen, lps=lps, cached=cached, ref=ref))
        history = history + gen + random_ids(MESSAGE, seed=100 + turn)
    assert len(history) >= 16 * CONTEXT
    return history, turns


def test_session_turns_hit_the_cache_and_match_the_oracle(session, oracle):
    history, turns = session
    oracle_lp = oracle.logprobs(history)  # every turn is a prefix of the last history
    for i, t in enumerate(turns):
        what = f"turn {i} ({t['start']} prompt tokens)"
        check_greedy(oracle_lp, t["start"], t["gen"], t["lps"], TOL, what)
        _same_as(t["gen"], t["lps"], *t["ref"][:2], oracle_lp, t["start"], what)
        assert t["ref"][2] == 0  # the caching-off engine computed everything
        if i:
            # Everything the previous turn put in the cache, in whole blocks: its
            # prompt and reply but the last token, whose KV is never computed.
            prev = turns[i - 1]
            assert t["cached"] == (prev["start"] + REPLY - 1) // BS * BS, what
            assert t["start"] - t["cached"] <= MESSAGE + BS  # what this turn computes: its new text
    assert turns[0]["cached"] == 0


@pytest.mark.parametrize("where", ["gap", "window"])
def test_a_prompt_diverging_from_a_cached_session_gets_no_wrong_hit(llm, oracle, session, where):
    history, turns = session
    end = turns[-1]["start"] + REPLY  # the cached session's last request
    d = {"gap": end - W - 20 * BS + 7, "window": end - W // 2 + 5}[where]
    assert POLICY.dense_tokens < d < end
    prompt = history[:d] + random_ids(150, seed=999)
    gen, lps, cached = greedy(llm, prompt, 40)
    # Resumes right before the first changed block: its sinks and window are cached
    # (the session computed them), the gap is not needed, nothing after d is reused.
    assert cached == d // BS * BS
    check_greedy(oracle.logprobs(prompt + gen), len(prompt), gen, lps, TOL, where)


def test_an_evicted_window_block_moves_the_hit_back(llm, oracle, session):
    """A hit needs all Wb blocks before it: evict one, and the request resumes at the
    longest prefix whose blocks are all still there (vLLM's own eviction call)."""
    history, turns = session
    d = turns[-1]["start"] - 3 * BS + 11
    h = d // BS
    prompt = history[:d] + random_ids(120, seed=998)
    manager = kv_manager(llm)
    pool = manager.block_pool
    probe = make_request_hashes(llm, prompt)
    gone = pool.get_cached_block(probe[h - 2], [0])[0]  # the 2nd-last window block of the hit
    pool.evict_blocks({gone.block_id})
    gen, lps, cached = greedy(llm, prompt, 30)
    assert cached == (h - 2) * BS  # the next h whose Wb blocks before it are all cached
    check_greedy(oracle.logprobs(prompt + gen), len(prompt), gen, lps, TOL, "after eviction")


def make_request_hashes(llm, prompt):
    from vllm.v1.request import Request

    core = llm.llm_engine.engine_core.engine_core
    req = Request(request_id="probe", prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=1),
                  pooling_params=None, block_hasher=core.request_block_hasher)
    return req.block_hashes


def test_concurrent_sessions_share_the_system_prompt_blocks(llm, oracle):
    """Three sessions with one system prompt as the sink, live at once: the system
    prompt's full blocks are computed once and shared; an aborted turn loses nothing."""
    engine = llm.llm_engine
    start_free = free_blocks(llm)
    histories = {f"s{k}": SYSTEM + random_ids(150 + 40 * k, seed=700 + k) for k in range(3)}
    finished: dict[str, list[tuple[int, list[int], torch.Tensor]]] = {s: [] for s in histories}
    peak = 0
    for turn in range(4):
        outs: dict[str, list] = {}
        for s, h in histories.items():
            engine.add_request(f"{s}-t{turn}", {"prompt_token_ids": h},
                               SamplingParams(max_tokens=REPLY, temperature=0, ignore_eos=True, logprobs=0))
        aborted = None
        shared_checked = False
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[out.request_id] = out
            live = live_blocks(llm)
            peak = max([peak, *live.values()])
            reqs = kv_manager(llm).coordinator.single_type_managers[0].req_to_blocks
            if len(reqs) == 3 and not shared_checked:
                firsts = [blocks[:SYSTEM_LEN // BS] for blocks in reqs.values()]
                assert all(a is b for f in firsts[1:] for a, b in zip(firsts[0], f))
                assert all(b.ref_cnt >= 3 for b in firsts[0])
                shared_checked = True
            if turn == 2 and aborted is None and "s1-t2" in outs and len(outs["s1-t2"].outputs[0].token_ids) >= 20:
                engine.abort_request(["s1-t2"])
                aborted = "s1-t2"
        assert shared_checked or turn == 0  # turn 0 may finish a prompt before the others start
        for s in histories:
            out = outs[f"{s}-t{turn}"]
            gen, lps = output_logprobs(out)
            if f"{s}-t{turn}" == aborted:
                histories[s] = histories[s] + gen  # the client keeps what it got
                continue
            assert len(gen) == REPLY
            finished[s].append((len(histories[s]), gen, lps))
            histories[s] = histories[s] + gen
        for s in histories:
            histories[s] = histories[s] + random_ids(300, seed=800 + turn * 10 + int(s[1]))
        assert free_blocks(llm) == start_free  # every block back (cached ones stay evictable)
    assert peak <= POLICY.max_live_blocks(CHUNK)
    for s, turns in finished.items():
        lp = oracle.logprobs(histories[s])
        for start, gen, lps in turns:
            check_greedy(lp, start, gen, lps, TOL, f"session {s} at {start}")
