"""The real ``sglang.Engine`` (CPU) with kv_policy="streaming-sink", against the oracle.

Tiny random Llama and Qwen3 (the same shape plus q/k RMSNorm before RoPE: SGLang's
Qwen3 normalises q/k, then calls its rotary op with the positions we remap; its aiter
fused norm+RoPE path is ROCm-only), max_position_embeddings 128; S=4, W=64, SGLang page size 1, so
the dense regime ends at token 69 and every stream here is 8-16x the context.
The KV pool (2048 slots) is smaller than what these streams would hold without
eviction, so they also show that the slots really go back to SGLang's allocator.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONTEXT
from oracle import OracleLlama
from sglang_helpers import CHUNK, TOL, S, Trace, W, engine_args, flush, greedy, \
    prompt_logprobs, random_ids, trace_path

from streaming_sink.policy import SinkPolicy

POLICY = SinkPolicy(S, W, 1)
BOUND = POLICY.max_live_blocks(CHUNK)  # sinks + window + current token + a prefill chunk


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return Trace(trace_path(tmp_path_factory))


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request) -> str:
    return request.getfixturevalue(f"tiny_{request.param}_128")


@pytest.fixture(scope="module")
def engine(model, trace):
    import sglang

    eng = sglang.Engine(**engine_args(model))
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def oracle(model):
    return OracleLlama(model, sink_tokens=S, window_tokens=W, block_size=1)


def test_teacher_forced_prompt_logprobs_match_oracle(engine, oracle, model):
    # 8x the context in 100-token chunks: the first chunk crosses the
    # dense->streaming switch at token 69, later chunk edges fall anywhere.
    ids = random_ids(8 * CONTEXT, seed=1)
    got = prompt_logprobs(engine, ids)
    want = oracle.token_logprobs(ids)
    diff = (got - want).abs()
    print(f"prompt logprobs, {len(ids)} tokens: max |engine - oracle| = {diff.max():.3g}")
    assert diff.max().item() < TOL, f"max diff {diff.max():.3g} at token {diff.argmax() + 1}"
    # Not a vacuous match: past the window, dense attention gives other numbers.
    dense = OracleLlama(model, sink_tokens=None)
    tail = slice(POLICY.dense_tokens, CONTEXT - 1)
    assert (dense.token_logprobs(ids[:CONTEXT])[tail] - want[tail]).abs().max() > 1e-2


def test_concurrent_greedy_decode_matches_oracle(engine, oracle):
    prompts = [random_ids(n, seed=10 + n) for n in (37, 300, 700)]
    n_new = 16 * CONTEXT
    for prompt, (gen, got) in zip(prompts, greedy(engine, prompts, n_new)):
        assert len(gen) == n_new
        lp = oracle.logprobs(prompt + gen)[len(prompt) - 1:-1]  # predictions of the generated tokens
        want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs()
        print(f"greedy, prompt {len(prompt)} + {n_new}: max |engine - oracle| = {diff.max():.3g}")
        assert diff.max().item() < TOL, f"prompt {len(prompt)}: max diff {diff.max():.3g} at step {diff.argmax()}"
        # Greedy: each token is the oracle's argmax, up to float near-ties.
        top2 = lp.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert clear.float().mean() > 0.95
        assert torch.equal(lp.argmax(1)[clear], torch.tensor(gen)[clear])


def test_kv_slots_bounded_and_all_returned(engine, trace):
    trace.clear()
    prompts = [random_ids(n, seed=n) for n in (10, 450, 1300)]
    n_new = 6 * CONTEXT
    outs = greedy(engine, prompts, n_new)
    assert all(len(gen) == n_new for gen, _ in outs)
    records = trace.records()
    held = [v for r in records for v in r["step"].values()]
    # SGLang's allocator holds exactly what the requests of a step hold once all
    # three decode together; an extend step lists only its own requests.
    together = [r for r in records if len(r["step"]) == len(prompts)]
    assert len(together) > n_new // 2
    # (+ the live slots the radix tree holds: shared prefixes, finished requests' KV)
    assert all(r["used"] == sum(r["step"].values()) + r["tree"] for r in together)
    assert max(r["used"] - r["tree"] for r in records) <= len(prompts) * BOUND
    peak = max(held)
    print(f"KV slots per request before a step's allocation: peak {peak} (S + W = {S + W}); "
          f"with the step's own slots <= {peak + CHUNK}, bound {BOUND}; without eviction up to {1300 + n_new}")
    # Before a step allocates, a streaming request holds exactly its sinks and window
    # (the window's newest key is the step's own token): everything older went back.
    assert peak == S + W and peak + CHUNK <= BOUND
    # A probe once they are done: before its own allocation, the pool holds only what the
    # radix tree keeps (live sinks + windows, evictable); after a flush, nothing.
    trace.clear()
    greedy(engine, [[5, 6]], 1)
    rec = trace.records()[0]
    assert rec["used"] == rec["tree"]
    flush(engine)
    trace.clear()
    greedy(engine, [[5, 6]], 1)
    assert trace.records()[0]["used"] == 0


def test_below_the_window_is_dense_attention(engine, model):
    """Queries before token S + W + 1 compute plain causal attention."""
    ids = random_ids(POLICY.dense_tokens, seed=5)
    want = OracleLlama(model, sink_tokens=None).token_logprobs(ids)
    assert (prompt_logprobs(engine, ids) - want).abs().max().item() < TOL
