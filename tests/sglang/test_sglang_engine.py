"""The real ``sglang.Engine`` (CPU) with kv_policy="streaming-sink", against an oracle, one
suite over (model family, oracle) pairs:

* Llama (tests/oracle.py);
* Qwen3: the Llama shape plus q/k RMSNorm before RoPE (SGLang's Qwen3 normalises q/k, then
  calls its rotary op with the positions we remap; its aiter fused norm+RoPE path is ROCm-only);
* Gemma 3 (tests/oracle_gemma3.py): sliding + global layers, each type with its own RoPE base,
  q/k RMSNorm, ``query_pre_attn_scalar`` scale, sandwich norms, final logit soft-cap. SGLang
  0.5.23 gives each attention block its own ``rotary_emb`` (its layer type's base), which the
  backend reads; on a CPU without AMX the model rotates q/k with the model-level
  ``Gemma3RotaryEmbedding`` pair instead, fed the same (remapped) positions; the local window
  is ``sliding_window - 1`` on the RadixAttention (SGLang counts back from the query), i.e.
  32 keys, inside W + 1; the soft-cap is SGLang's logits processor's, outside attention
  (docs/gemma3.md);
* GPT-OSS (tests/oracle_gptoss.py): learned sinks, sliding + full layers, YaRN, MoE. SGLang
  keeps the sink logits in bfloat16 (float32 only for trtllm_mha), so the model's are written
  bfloat16-exact (conftest.py): the comparison is of the attention, not of a cast. On CPU,
  SGLang 0.5.23 picks its ``triton_kernel`` MoE runner for an unquantized GPT-OSS and then
  multiplies its transposed expert layout the wrong way round, with or without this plugin:
  ``--moe-runner-backend triton`` runs the native MoE path. SGLang insists on a backend name
  from its list for GPT-OSS; ours replaces it.

Every model: tiny random, max_position_embeddings 128; S=4, W=64, SGLang page size 1, so the
dense regime ends at token 69 and every stream here is 8-16x the context. Prefill runs in
100-token chunks (the first crosses the switch; past it they take ``prefill.chunk_attention``).
The KV pool (2048 slots) is smaller than these streams would hold without eviction, so they
also show that the slots really go back to SGLang's allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from conftest import CONTEXT
from oracle import OracleLlama
from oracle_gemma3 import OracleGemma3
from oracle_gptoss import OracleGptOss
from sglang_helpers import CHUNK, TOL, S, Trace, W, engine_args, flush, greedy, \
    prompt_logprobs, random_ids, trace_path

from streaming_sink.policy import SinkPolicy

POLICY = SinkPolicy(S, W, 1)
BOUND = POLICY.max_live_blocks(CHUNK)  # sinks + window + current token + a prefill chunk


@dataclass(frozen=True)
class Family:
    name: str
    model: str  # conftest fixture of the tiny model
    oracle: type
    prompt_seed: int  # 8x-context prompt of the teacher-forced test
    decode_prompts: tuple[int, ...]  # prompt lengths of the concurrent greedy test
    decode_seed: int  # their seeds: decode_seed + length
    dense_differs: float  # past the window, the dense oracle differs at least this much
    clear_argmax: float | None  # greedy: share of steps without a near-tie (None: not checked)
    engine: dict = field(default_factory=dict)  # extra sglang.Engine keywords


FAMILIES = [
    Family("llama", "tiny_llama_128", OracleLlama, 1, (37, 300, 700), 10, 1e-2, 0.95),
    Family("qwen3", "tiny_qwen3_128", OracleLlama, 1, (37, 300, 700), 10, 1e-2, 0.95),
    Family("gemma3", "tiny_gemma3_128", OracleGemma3, 7, (37, 300), 20, 1e-3, 0.9),
    Family("gptoss", "tiny_gptoss_128", OracleGptOss, 3, (50, 400), 40, 0.0, None,
           dict(attention_backend="triton", moe_runner_backend="triton")),
]


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return Trace(trace_path(tmp_path_factory))


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def model(family, request) -> str:
    return request.getfixturevalue(family.model)


@pytest.fixture(scope="module")
def engine(family, model, trace):
    import sglang

    eng = sglang.Engine(**engine_args(model, **family.engine))
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def oracle(family, model):
    return family.oracle(model, sink_tokens=S, window_tokens=W, block_size=1)


def _not_vacuous(family: Family, model: str, oracle, ids: list[int], want: torch.Tensor) -> None:
    """What the match shows: past the window the contract computes other numbers than the
    dense model, and each family's own feature (RoPE bases, learned sinks) matters."""
    if family.dense_differs:
        dense = family.oracle(model, sink_tokens=None)
        tail = slice(POLICY.dense_tokens, CONTEXT - 1)
        assert (dense.token_logprobs(ids[:CONTEXT])[tail] - want[tail]).abs().max() > family.dense_differs
    if family.name == "gemma3":  # each layer type's own RoPE base: swapped, another stream
        swapped = OracleGemma3(model, sink_tokens=S, window_tokens=W, block_size=1)
        swapped.inv_freq = {"sliding_attention": oracle.inv_freq["full_attention"],
                            "full_attention": oracle.inv_freq["sliding_attention"]}
        assert (swapped.token_logprobs(ids[:160]) - want[:159]).abs().max() > 1e-2
    if family.name == "gptoss":  # the learned sinks: without them, another stream
        no_sinks = OracleGptOss(model, sink_tokens=S, window_tokens=W, block_size=1)
        for layer in no_sinks.layers:
            layer["sinks"] = torch.full_like(layer["sinks"], -1e9)
        assert (no_sinks.token_logprobs(ids[:300]) - want[:299]).abs().max() > 1e-2


def test_teacher_forced_prompt_logprobs_match_oracle(family, engine, oracle, model):
    # 8x the context in 100-token chunks: the first chunk crosses the
    # dense->streaming switch at token 69, later chunk edges fall anywhere.
    ids = random_ids(8 * CONTEXT, seed=family.prompt_seed)
    got = prompt_logprobs(engine, ids)
    want = oracle.token_logprobs(ids)
    diff = (got - want).abs()
    print(f"{family.name} prompt logprobs, {len(ids)} tokens: max |engine - oracle| = {diff.max():.3g}")
    assert diff.max().item() < TOL, f"max diff {diff.max():.3g} at token {diff.argmax() + 1}"
    _not_vacuous(family, model, oracle, ids, want)


def test_concurrent_greedy_decode_matches_oracle(family, engine, oracle):
    prompts = [random_ids(n, seed=family.decode_seed + n) for n in family.decode_prompts]
    n_new = 16 * CONTEXT
    for prompt, (gen, got) in zip(prompts, greedy(engine, prompts, n_new)):
        assert len(gen) == n_new
        lp = oracle.logprobs(prompt + gen)[len(prompt) - 1:-1]  # predictions of the generated tokens
        want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs()
        print(f"{family.name} greedy, prompt {len(prompt)} + {n_new}: max |engine - oracle| = {diff.max():.3g}")
        assert diff.max().item() < TOL, f"prompt {len(prompt)}: max diff {diff.max():.3g} at step {diff.argmax()}"
        if family.clear_argmax is not None:  # greedy: each token is the oracle's argmax, up to near-ties
            top2 = lp.topk(2, dim=1).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-3
            assert clear.float().mean() > family.clear_argmax
            assert torch.equal(lp.argmax(1)[clear], torch.tensor(gen)[clear])


def test_kv_slots_bounded_and_all_returned(family, engine, trace):
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
    print(f"{family.name} KV slots per request before a step's allocation: peak {peak} (S + W = {S + W}); "
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


def test_below_the_window_is_dense_attention(family, engine, model):
    """Queries before token S + W + 1 compute plain causal attention."""
    ids = random_ids(POLICY.dense_tokens, seed=5)
    want = family.oracle(model, sink_tokens=None).token_logprobs(ids)
    assert (prompt_logprobs(engine, ids) - want).abs().max().item() < TOL


def test_radix_cache_turns_match_oracle(family, engine, oracle):
    """The radix cache (on by default): a 3-turn session, each turn served from the cache
    but its new message, equals the oracle (Llama's long sessions: test_sglang_radix.py)."""
    prompt, cached_want = random_ids(300, seed=60), 0
    flush(engine)  # the earlier tests' streams may share this prompt's first tokens
    for turn in range(3):
        out = engine.generate(input_ids=[prompt], sampling_params={
            "max_new_tokens": 40, "temperature": 0, "ignore_eos": True}, return_logprob=True)[0]
        lps = out["meta_info"]["output_token_logprobs"]
        gen, got = [t for _, t, _ in lps], torch.tensor([x for x, _, _ in lps], dtype=torch.float64)
        cached = out["meta_info"]["cached_tokens"]
        assert cached == cached_want, f"turn {turn}: {cached} cached, want {cached_want}"
        lp = oracle.logprobs(prompt + gen)[len(prompt) - 1:-1]
        want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs().max().item()
        print(f"{family.name} radix turn {turn}: prompt {len(prompt)}, cached {cached}, max diff {diff:.3g}")
        assert diff < TOL
        cached_want = len(prompt) + len(gen) - 1
        prompt = prompt + gen + random_ids(30, seed=61 + turn)


def test_a_request_without_max_new_tokens_stops_at_the_context(family, engine):
    """No max_new_tokens (an OpenAI request without max_tokens): at most the model's own
    context of new tokens, as without the policy, though --context-length (the longest
    stream) is 16x that here; a request that sets it gets it all (the greedy test: 16x)."""
    assert engine.server_args.context_length > 8 * CONTEXT  # what SGLang alone would allow
    prompts = [random_ids(n, seed=5 + n) for n in (10, 300)]  # below and past the context
    outs = engine.generate(input_ids=prompts, sampling_params={
        "max_new_tokens": None, "temperature": 0, "ignore_eos": True})
    for out in outs:
        meta = out["meta_info"]
        assert meta["completion_tokens"] == CONTEXT, meta
        assert meta["finish_reason"]["type"] == "length", meta


def test_gemma3_local_window_longer_than_policy_window_refused(tmp_path):
    """A sliding layer needs its whole window inside the policy's: 80 > W + 1 = 65 is
    refused at startup, in the main process, naming the --sink-window that would fit."""
    import sglang

    from tiny_models import build_tiny_gemma3

    from streaming_sink.policy import PolicyConfigError

    path = build_tiny_gemma3(tmp_path / "sw80", max_position_embeddings=CONTEXT, sliding_window=80)
    with pytest.raises(PolicyConfigError, match="--sink-window >= 79"):
        sglang.Engine(**engine_args(path))
