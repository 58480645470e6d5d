"""SGLang's retract (decode out of KV memory -> ``ScheduleBatch.retract_decode``) of a
running stream under the policy, with the real ``sglang.Engine`` (CPU): the retracted
stream is recomputed and resumes, its tokens and logprobs equal the oracle's (what an
unpressured run gives), and every KV slot comes back.

Why pressure needs the optimistic estimate (docs/sglang.md, "Retract"): a request past
the window holds S + W + 1 slots at most, and admission counts a running request's future
demand as min(new_token_ratio x remaining, S + W + 1) on top of what it holds. With
``ignore_eos`` (ratio 1) or SGLang's default ratio and long streams, that claim covers
every request's growth, so decode never runs out. With a low
``--schedule-conservativeness`` (SGLang's knob for a more optimistic ratio), several short
prompts are admitted while they still grow, and their growth to S + W + 1 each overflows
the pool. Here: three 10-token prompts and one 90-token prompt (past the window from its
first step), a pool of 264 slots: round 1 admits two (each reserves 10 + 1 + S + W + 1),
round 2 the other two (the 90-token prompt's demand is S + W + 90, the last slot of
room); the four need 4 x (S + W + 1) + 4 = 280 at a decode check, so SGLang retracts; of
equal output lengths it retracts the longest prompt first (``_get_decode_retraction_order``):
the stream past the window. Three fit (3 x 70 = 210), so it resumes once one finishes.
"""

from __future__ import annotations

import pytest
import torch

from oracle import OracleLlama
from tiny_models import EOS_ID
from sglang_helpers import CHUNK, TOL, S, Trace, W, engine_args, flush, random_ids, trace_path

from streaming_sink.policy import SinkPolicy

POLICY = SinkPolicy(S, W, 1)
POOL = 264  # the 4 get admitted in SGLang's first two prefill rounds (after a refusal it waits for a finish)
NEW = 300
PROMPTS = [(10, 41), (10, 42), (10, 43), (90, 44)]  # (length, seed); the last is past the window at once


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return Trace(trace_path(tmp_path_factory))


@pytest.fixture(scope="module")
def engine(tiny_llama_128, trace):
    import sglang

    eng = sglang.Engine(**engine_args(tiny_llama_128, max_total_tokens=POOL, schedule_conservativeness=0.01))
    try:
        yield eng
    finally:
        eng.shutdown()


def test_retracted_stream_resumes_exactly_and_returns_every_slot(engine, trace, tiny_llama_128):
    assert POLICY.dense_tokens < PROMPTS[-1][0] and len(PROMPTS) * (POLICY.dense_tokens + 1) > POOL
    prompts = [random_ids(n, seed=seed) for n, seed in PROMPTS]
    trace.clear()
    # Not ignore_eos (SGLang would then claim every remaining token); min_new_tokens masks
    # EOS instead (the tiny random model emits it often), so every stream runs NEW tokens.
    outs = engine.generate(input_ids=prompts, sampling_params={
        "max_new_tokens": NEW, "min_new_tokens": NEW, "temperature": 0}, return_logprob=True)
    retractions = [out["meta_info"].get("num_retractions", 0) for out in outs]
    print(f"retractions per request: {retractions}; output lengths: "
          f"{[len(o['meta_info']['output_token_logprobs']) for o in outs]}")
    assert retractions[-1] >= 1, "the stream past the window was never retracted: the test lost its pressure"
    oracle = OracleLlama(tiny_llama_128, sink_tokens=S, window_tokens=W, block_size=1)
    for prompt, out in zip(prompts, outs):
        lp = out["meta_info"]["output_token_logprobs"]
        gen = [t for _, t, _ in lp]
        got = torch.tensor([x for x, _, _ in lp], dtype=torch.float64)
        assert len(gen) == NEW and len(prompt) + len(gen) > 2 * POLICY.dense_tokens  # well past the window
        want_all = oracle.logprobs(prompt + gen)[len(prompt) - 1:-1]
        want_all[:, EOS_ID] = float("-inf")  # min_new_tokens: SGLang samples (and reports) without EOS
        want_all = want_all - torch.logsumexp(want_all, dim=1, keepdim=True)
        want = want_all.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs()
        print(f"prompt {len(prompt)} + {len(gen)}: max |engine - oracle| = {diff.max():.3g}")
        assert diff.max().item() < TOL, f"prompt {len(prompt)}: max diff {diff.max():.3g} at step {diff.argmax()}"
        top2 = want_all.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert clear.float().mean() > 0.95
        assert torch.equal(want_all.argmax(1)[clear], torch.tensor(gen)[clear])
    records = trace.records()
    assert max(r["used"] for r in records) <= POOL
    # Own slots per request stay within the policy's bound, before and after the retract.
    assert max(v for r in records for v in r["step"].values()) <= POLICY.max_live_blocks(CHUNK)
    # No slot leaked: before a probe's allocation the pool holds only the radix tree's live
    # slots (finished requests' sinks + windows); after a flush, nothing.
    trace.clear()
    engine.generate(input_ids=[[5, 6]], sampling_params={"max_new_tokens": 1, "temperature": 0})
    rec = trace.records()[0]
    assert rec["used"] == rec["tree"]
    flush(engine)
    trace.clear()
    engine.generate(input_ids=[[5, 6]], sampling_params={"max_new_tokens": 1, "temperature": 0})
    assert trace.records()[0]["used"] == 0
