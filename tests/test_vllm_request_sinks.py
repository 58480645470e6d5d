"""Per-request sink lengths in the real vLLM CPU engine (issue 23), against the oracle.

One engine: tiny random Llama (256-token context), block 32, window 64, server default
S = 4, --max-sink-tokens 128 (the default window would be resolved against it; given
here). Requests carry ``SamplingParams(extra_args={"sink_tokens": N})``, as
``vllm_xargs`` becomes over HTTP; each one's stream is checked against the float64
oracle with its own S, in one batch: S = 0, 37 (not a multiple of the block), 100
(larger than the window), and the default beside them. The HTTP parts (400s, the
system-turn mode through the chat endpoint) are in tests/test_vllm_request_sinks_server.py.
"""

from __future__ import annotations

import pytest
import torch

from oracle import OracleLlama, check_greedy
from vllm_helpers import SamplingParams, free_blocks, kv_manager, make_llm, random_ids, \
    output_logprobs

from streaming_sink.policy import SinkPolicy

CONTEXT, BS, W, DEFAULT, CAP = 256, 32, 64, 4, 128
CHUNK = 200  # max_num_batched_tokens
SERVER = SinkPolicy(DEFAULT, W, BS)
SINKS = [None, 0, 37, 100]  # None: no field (the server default)
TOL = 2e-4


def own(s: int | None) -> int:
    return DEFAULT if s is None else s


def params(s: int | None, **kw) -> SamplingParams:
    return SamplingParams(extra_args=None if s is None else {"sink_tokens": s}, **kw)


@pytest.fixture(scope="module")
def model(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def llm(model):
    engine = make_llm(model, block_size=BS, sink_tokens=DEFAULT, sink_window=W, max_sink_tokens=CAP,
                      max_num_batched_tokens=CHUNK)
    yield engine
    del engine


def oracle(model, s):
    return OracleLlama(model, sink_tokens=own(s), window_tokens=W, block_size=BS)


def test_prompt_logprobs_several_sink_lengths_in_one_batch(llm, model):
    """Teacher-forced, 6x the context, four S in one batch (chunked prefill mixes them)."""
    prompts = [random_ids(6 * CONTEXT + 7 * i, seed=40 + i) for i in range(len(SINKS))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params(s, max_tokens=1, prompt_logprobs=0, temperature=0) for s in SINKS],
                        use_tqdm=False)
    wants = {}
    for s, ids, out in zip(SINKS, prompts, outs):
        got = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))],
                           dtype=torch.float64)
        want = wants[own(s)] = oracle(model, s).token_logprobs(ids)
        diff = (got - want).abs()
        assert diff.max().item() < TOL, f"S={own(s)}: max |engine - oracle| {diff.max():.3g} at {diff.argmax() + 1}"
    # Not vacuous: each S gives another stream (same tokens, another S -> other numbers).
    ids = prompts[2]
    other = oracle(model, 100).token_logprobs(ids)
    assert (other - wants[37]).abs().max() > 1e-2


def test_greedy_decodes_several_sink_lengths_in_one_batch(llm, model):
    prompts = [random_ids(n, seed=60 + n) for n in (300, 41, 700, 130)]
    n_new = 4 * CONTEXT
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params(s, max_tokens=n_new, temperature=0, ignore_eos=True, logprobs=0) for s in SINKS],
                        use_tqdm=False)
    for s, prompt, out in zip(SINKS, prompts, outs):
        gen, lps = output_logprobs(out)
        assert len(gen) == n_new
        lp = oracle(model, s).logprobs(prompt + gen)
        check_greedy(lp, len(prompt), gen, lps, TOL, f"S={own(s)}")


def _sink_manager(llm):
    return kv_manager(llm).coordinator.single_type_managers[0]


def test_blocks_bounded_by_each_requests_own_policy(llm):
    """Each request holds at most its own Sb + Wb + 1 (+ a chunk's) blocks, pins exactly its
    own Sb sink blocks once past the window, and every block comes back."""
    start = free_blocks(llm)
    engine, manager = llm.llm_engine, _sink_manager(llm)
    sinks = {f"r{i}": s for i, s in enumerate(SINKS)}
    for i, (rid, s) in enumerate(sinks.items()):
        engine.add_request(rid, {"prompt_token_ids": random_ids(100 + 250 * i, seed=80 + i)},
                           params(s, max_tokens=3 * CONTEXT, temperature=0, ignore_eos=True))
    peak = dict.fromkeys(sinks, 0)
    pinned_seen = {rid: set() for rid in sinks}
    while engine.has_unfinished_requests():
        engine.step()
        for rid, blocks in manager.req_to_blocks.items():
            policy = SERVER.with_sinks(own(sinks[rid.split("-")[0]]))
            pinned, gap_end, live = manager._live(blocks, policy)
            name = rid.split("-")[0]  # vLLM appends a suffix to the request id
            peak[name] = max(peak[name], live)
            if gap_end > policy.sink_blocks:  # past the window: the gap is recycled
                pinned_seen[name].add(pinned)
    for rid, s in sinks.items():
        policy = SERVER.with_sinks(own(s))
        assert policy.sink_blocks + policy.window_blocks < peak[rid] <= policy.max_live_blocks(CHUNK), rid
        assert pinned_seen[rid] == {policy.sink_blocks}, (rid, pinned_seen[rid])
    assert manager._policies == {}  # nothing left behind for finished requests
    assert free_blocks(llm) == start


def test_prefix_cache_same_S_hits_other_S_does_not_share(llm, model):
    """A session's turn with its own S resumes from the cache; the same tokens with another
    S (default included) never reuse those blocks (their positions differ)."""
    history = random_ids(5 * CONTEXT, seed=91)
    turn2 = history + random_ids(40, seed=92)
    sp = lambda s: params(s, max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)  # noqa: E731
    first = llm.generate([{"prompt_token_ids": history}], sp(37), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    again = llm.generate([{"prompt_token_ids": turn2}], sp(37), use_tqdm=False)[0]
    assert again.num_cached_tokens >= len(history) - BS  # resumed near the previous turn's end
    gen, lps = output_logprobs(again)
    check_greedy(oracle(model, 37).logprobs(turn2 + gen), len(turn2), gen, lps, TOL, "S=37 resumed")
    for s in (100, None):  # other positions: no block shared
        other = llm.generate([{"prompt_token_ids": turn2}], sp(s), use_tqdm=False)[0]
        assert other.num_cached_tokens == 0, s
        gen, lps = output_logprobs(other)
        check_greedy(oracle(model, s).logprobs(turn2 + gen), len(turn2), gen, lps, TOL, f"S={own(s)}")
    # and a second S=100 turn now hits the S=100 blocks
    assert llm.generate([{"prompt_token_ids": turn2 + [5]}], sp(100), use_tqdm=False)[0].num_cached_tokens > 0


@pytest.mark.parametrize("value, words", [
    (-1, "sink_tokens must be >= 0"), (CAP + 1, "above this server's --max-sink-tokens 128"),
    ("8", "must be an integer"), (2.5, "must be an integer")])
def test_bad_values_refused_before_the_engine(llm, value, words):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=words) as e:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params(value, max_tokens=2), use_tqdm=False)
    assert e.value.parameter == "sink_tokens"
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params(CAP, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # the engine is fine


@pytest.mark.parametrize("kw, v1_needed", [
    (dict(kv_policy="streaming-sink", sink_tokens=DEFAULT, max_sink_tokens=CAP), True),
    (dict(kv_policy="streaming-sink", sink_tokens="system", max_sink_tokens=CAP), True),
    (dict(kv_policy="streaming-sink", sink_tokens=DEFAULT), False),
    (dict(), False)])
def test_per_request_sinks_put_vllm_on_its_v1_runner(model, kw, v1_needed):
    """vLLM 0.33 on CUDA defaults to the V2 model runner, which this package does not hook for
    per-request S. When the server enables them, vLLM's own list of what V2 does not support
    names them, so vLLM picks V1 (and logs why) unless VLLM_USE_V2_MODEL_RUNNER says otherwise.
    The list is read the same way in the CPU build (tests/cuda_build probes the CUDA one)."""
    import vllm_sink  # noqa: F401  (the EngineArgs keywords)
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink.hooks.per_request_sinks import V2_UNSUPPORTED

    config = EngineArgs(model=model, block_size=BS, dtype="float32", **kw).create_engine_config()
    assert (V2_UNSUPPORTED in config._get_v2_model_runner_unsupported_features()) is v1_needed


def test_a_v2_runner_refuses_a_requests_own_sinks_naming_the_field():
    """Where V2 runs anyway (VLLM_USE_V2_MODEL_RUNNER=1): a request's own S is a 400 that says
    how to serve it; the server default still goes through."""
    from vllm.exceptions import VLLMValidationError

    from vllm_sink.request_sinks import frontend_sink_tokens

    opts = {"sink_tokens": DEFAULT, "max_sink_tokens": CAP}
    assert frontend_sink_tokens(params(None), opts, v2_runner=True) == DEFAULT
    with pytest.raises(VLLMValidationError, match="VLLM_USE_V2_MODEL_RUNNER=0") as e:
        frontend_sink_tokens(params(37), opts, v2_runner=True)
    assert e.value.parameter == "sink_tokens"
    assert frontend_sink_tokens(params(37), opts, v2_runner=False) == 37
