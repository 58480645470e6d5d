"""A tiny random Gemma 3 (sliding + global layers, each type with its own RoPE base, q/k
RMSNorm, ``query_pre_attn_scalar`` scale, sandwich norms, final logit soft-cap) through the
real ``sglang.Engine`` (CPU) with the policy on, against the Gemma 3 oracle
(tests/oracle_gemma3.py).

Model: ``tests/tiny_models.py::build_tiny_gemma3`` with a 128-position context (local
window 32, RoPE bases 1e4 local / 1e6 global). Policy: S = 4, W = 64, SGLang page size 1
(dense regime: tokens [0, 69)); the local layers' window 32 fits W + 1.

What SGLang 0.5.23's Gemma 3 does and how the plugin meets it (docs/gemma3.md, SGLang):
each attention block has its own ``rotary_emb`` from ``get_rope`` with its layer type's
base, which the backend reads for the per-block query rotation; on a CPU without AMX the
model rotates q/k with the model-level ``Gemma3RotaryEmbedding`` pair instead, fed the same
(remapped) ``forward_batch.positions``; the local window is ``sliding_window - 1`` on the
RadixAttention (SGLang counts back from the query), i.e. 32 keys; ``logit_cap`` is 0; the
final soft-cap is SGLang's logits processor's, outside attention.
"""

from __future__ import annotations

import pytest
import torch

from oracle_gemma3 import OracleGemma3
from sglang_helpers import CHUNK, TOL, S, Trace, W, engine_args, flush, greedy, prompt_logprobs, \
    random_ids, trace_path

from streaming_sink.policy import SinkPolicy

CONTEXT = 128
POLICY = SinkPolicy(S, W, 1)
BOUND = POLICY.max_live_blocks(CHUNK)  # sinks + window + current token + a prefill chunk


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> str:
    from tiny_models import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return Trace(trace_path(tmp_path_factory))


@pytest.fixture(scope="module")
def engine(tiny_gemma3, trace):
    import sglang

    eng = sglang.Engine(**engine_args(tiny_gemma3))
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def oracle(tiny_gemma3):
    return OracleGemma3(tiny_gemma3, sink_tokens=S, window_tokens=W, block_size=1)


def test_gemma3_prompt_logprobs_match_oracle(engine, oracle, tiny_gemma3):
    # 8x the context in 100-token chunks: the first chunk crosses the switch at token 69.
    ids = random_ids(8 * CONTEXT, seed=7)
    got = prompt_logprobs(engine, ids)
    want = oracle.token_logprobs(ids)
    diff = (got - want).abs()
    print(f"Gemma 3 prompt logprobs, {len(ids)} tokens: max |engine - oracle| = {diff.max():.3g}")
    assert diff.max().item() < TOL, f"max diff {diff.max():.3g} at token {diff.argmax() + 1}"
    # Not a vacuous match: past the window, dense attention gives other numbers.
    dense = OracleGemma3(tiny_gemma3, sink_tokens=None)
    tail = slice(POLICY.dense_tokens, CONTEXT - 1)
    assert (dense.token_logprobs(ids[:CONTEXT])[tail] - want[tail]).abs().max() > 1e-3
    # Each layer type's own RoPE base matters: with the bases swapped the stream is another one.
    swapped = OracleGemma3(tiny_gemma3, sink_tokens=S, window_tokens=W, block_size=1)
    swapped.inv_freq = {"sliding_attention": oracle.inv_freq["full_attention"],
                        "full_attention": oracle.inv_freq["sliding_attention"]}
    assert (swapped.token_logprobs(ids[:160]) - want[:159]).abs().max() > 1e-2


def test_gemma3_local_window_longer_than_policy_window_refused(tmp_path):
    """A sliding layer needs its whole window inside the policy's: 80 > W + 1 = 65 is
    refused at startup, in the main process, naming the --sink-window that would fit."""
    import sglang

    from tiny_models import build_tiny_gemma3

    from streaming_sink.policy import PolicyConfigError

    path = build_tiny_gemma3(tmp_path / "sw80", max_position_embeddings=CONTEXT, sliding_window=80)
    with pytest.raises(PolicyConfigError, match="--sink-window >= 79"):
        sglang.Engine(**engine_args(path))


def test_gemma3_concurrent_greedy_decode_matches_oracle_bounded(engine, oracle, trace):
    trace.clear()
    prompts = [random_ids(n, seed=20 + n) for n in (37, 300)]
    n_new = 16 * CONTEXT
    outs = greedy(engine, prompts, n_new)
    for prompt, (gen, got) in zip(prompts, outs):
        assert len(gen) == n_new
        lp = oracle.logprobs(prompt + gen)[len(prompt) - 1:-1]  # predictions of the generated tokens
        want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs()
        print(f"Gemma 3 greedy, prompt {len(prompt)} + {n_new}: max |engine - oracle| = {diff.max():.3g}")
        assert diff.max().item() < TOL, f"prompt {len(prompt)}: max diff {diff.max():.3g} at step {diff.argmax()}"
        # Greedy: each token is the oracle's argmax, up to float near-ties.
        top2 = lp.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert clear.float().mean() > 0.9
        assert torch.equal(lp.argmax(1)[clear], torch.tensor(gen)[clear])
    # Live slots per request within the bound; SGLang's allocator holds what the requests hold.
    records = trace.records()
    held = [v for r in records for v in r["step"].values()]
    together = [r for r in records if len(r["step"]) == len(prompts)]
    assert len(together) > n_new // 2
    assert all(r["used"] == sum(r["step"].values()) + r["tree"] for r in together)
    assert max(r["used"] - r["tree"] for r in records) <= len(prompts) * BOUND
    peak = max(held)
    print(f"Gemma 3 KV slots per request before a step's allocation: peak {peak} (S + W = {S + W}), "
          f"bound {BOUND}; without eviction up to {300 + n_new}")
    assert peak == S + W and peak + CHUNK <= BOUND
    # All slots back: after a flush the pool is empty.
    flush(engine)
    trace.clear()
    greedy(engine, [[5, 6]], 1)
    assert trace.records()[0]["used"] == 0
