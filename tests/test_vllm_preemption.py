"""Preemption under the policy: vLLM's scheduler runs out of KV blocks mid-decode,
preempts running streams (recompute), and resumes them; they must come out as an
unpressured run's, with no block lost.

Why preemption happens at all under the policy: vLLM admits a request when its
*prompt* fits (``full_sequence_must_fit`` counts ``request.num_tokens``, capped by
the spec's ``max_admission_blocks_per_request``), not its future decode. A request
admitted with a one-block prompt then grows to ``Sb + Wb + 1`` live blocks while it
decodes past the window. Four such requests need 4 x 6 = 24 blocks; a 16-block pool
holds two and a half, so the scheduler must preempt.

A preempted request is recomputed from token 0 (prompt + tokens so far, chunked
prefill through the window). With prefix caching on, its freed blocks are still
hashed and the resume is a prefix hit on its own sinks + window (kv_manager.py).
"""

from __future__ import annotations

import pytest
import torch
from vllm_helpers import BS, S, W, engine_core, free_blocks, make_llm, random_ids

from streaming_sink.policy import SinkPolicy

POOL = 16  # blocks; the bound for one request mid-prefill (200-token chunks) is 13
N_REQ, GEN = 4, 420  # 4 streams to ~440 tokens: past the 192-token dense regime, 2.3x the window


def _run(llm, prompts):
    """Step the engine through the streams; returns (outputs, preemptions seen, peak
    blocks any request held, the most blocks held at once)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p},
                           SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, logprobs=0))
    sched = engine_core(llm).scheduler
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    final, preempted, peak, held = {}, set(), 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
        for rid, req in sched.requests.items():
            if req.num_preemptions:
                preempted.add(rid)
        per_req = [sum(not b.is_null for b in blocks) for m in managers for blocks in m.req_to_blocks.values()]
        peak = max([peak, *per_req])
        held = max(held, sum(per_req))
    return final, preempted, peak, held


def _tokens_and_logprobs(out):
    gen = list(out.outputs[0].token_ids)
    return gen, torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, gen)], dtype=torch.float64)


PROMPTS = [random_ids(9 + 5 * i, seed=40 + i) for i in range(N_REQ)]  # each inside one block


@pytest.fixture(scope="module")
def unpressured(tiny_llama):
    roomy = make_llm(tiny_llama, enable_prefix_caching=False)
    want, preempted, _, _ = _run(roomy, PROMPTS)
    assert not preempted  # the reference really ran unpressured
    return want


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_preempted_streams_resume_as_an_unpressured_run(tiny_llama, unpressured, prefix_caching):
    policy = SinkPolicy(S, W, BS)
    want = unpressured
    tight = make_llm(tiny_llama, enable_prefix_caching=prefix_caching, num_gpu_blocks_override=POOL)
    free_at_start = free_blocks(tight)
    got, preempted, peak, held = _run(tight, PROMPTS)

    assert len(preempted) >= 1, "the 16-block pool never forced a preemption"
    assert held <= POOL
    assert peak <= policy.max_live_blocks(200)  # the bound, prefill chunk included
    for rid in map(str, range(N_REQ)):
        tokens, lps = _tokens_and_logprobs(got[rid])
        want_tokens, want_lps = _tokens_and_logprobs(want[rid])
        assert len(tokens) == GEN
        assert tokens == want_tokens, f"request {rid} (preempted: {rid in preempted})"
        assert (lps - want_lps).abs().max().item() < 2e-4, rid
    assert free_blocks(tight) == free_at_start  # every block back in the pool
    for m in engine_core(tight).scheduler.kv_cache_manager.coordinator.single_type_managers:
        assert not m.req_to_blocks
