"""n-gram speculative decoding under --kv-policy streaming-sink, on the real vLLM CPU engine.

A verification step runs 1 + k query rows per request (the last token and k drafts)
through the same dense/streaming split and kernels as a prefill chunk; rejected drafts
roll ``num_computed_tokens`` back before vLLM frees the window's gap from the processed
count (vllm_sink/kv_manager.py). So: greedy with speculation == greedy without it, both
the float64 oracle's, over a stream 8x the tiny model's context; drafts really get
accepted (a repetitive prompt) and rejected; blocks stay within the policy's bound for
a step of 1 + k tokens and all come back after finish and abort; prefix caching on.
"""

from __future__ import annotations

import os

# vLLM's n-gram proposer runs numba with a thread pool of its own; on a few shared cores its
# threads spin against torch's (every op of a step then waits a time slice: ~40x slower).
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import pytest  # noqa: E402

from oracle import OracleLlama, check_greedy  # noqa: E402
from vllm_helpers import BS, S, W, SamplingParams, engine_core, free_blocks, greedy, \
    kv_manager, make_llm, output_logprobs, random_ids  # noqa: E402

from streaming_sink.policy import SinkPolicy  # noqa: E402

CONTEXT = 256  # the tiny model's max_position_embeddings
POLICY = SinkPolicy(S, W, BS)
K = 3  # drafts per step
SPEC = dict(method="ngram", num_speculative_tokens=K, prompt_lookup_max=4, prompt_lookup_min=2)
TOL = 2e-4  # float32 engine vs float64 oracle, logprobs (as test_vllm_engine.py)
PROMPT = random_ids(32, seed=5) * 4  # 128 tokens of a 32-token phrase: n-gram drafts match
N_NEW = 8 * CONTEXT - len(PROMPT)  # the stream: 2048 tokens, 8x the context


# The n-gram engine is built last: its drafter imports numba, and vLLM 0.32 then fails to
# build any further engine in the process (its Triton-override scan of sys.modules trips on
# llvmlite's library proxy: stock vLLM, not the policy). tests/conftest.py runs this module last.

@pytest.fixture(scope="module")
def plain(tiny_llama):
    engine = make_llm(tiny_llama, enable_prefix_caching=True)
    yield engine
    del engine


@pytest.fixture(scope="module")
def spec(tiny_llama, plain):
    engine = make_llm(tiny_llama, speculative_config=SPEC, enable_prefix_caching=True,
                      disable_log_stats=False, per_request_spec_decode_metrics="detailed")
    yield engine
    del engine


def _stream(llm, rid: str, prompt: list[int], n: int, abort_after: int | None = None):
    """Step one greedy request through the engine: (last output, the most blocks it held
    in any decode step, in any step)."""
    engine = llm.llm_engine
    engine.add_request(rid, {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    last, decode_peak, peak = None, 0, 0
    while engine.has_unfinished_requests():
        decoding = last is not None and bool(last.outputs[0].token_ids)  # this step decodes
        for out in engine.step():
            last = out
        held = max((sum(not b.is_null for b in blocks) for blocks in manager.req_to_blocks.values()),
                   default=0)  # the one request (vLLM adds a suffix to its id)
        peak = max(peak, held)
        if decoding:  # (the step giving the first token still holds the last prefill chunk)
            decode_peak = max(decode_peak, held)
        if abort_after is not None and last is not None and len(last.outputs[0].token_ids) >= abort_after:
            engine.abort_request([rid])
            abort_after = None
    return last, decode_peak, peak


@pytest.fixture(scope="module")
def streamed(plain, spec):
    """The stream with and without speculation (the plain one through LLM.generate)."""
    start = free_blocks(spec)
    out, decode_peak, peak = _stream(spec, "spec", PROMPT, N_NEW)
    gen, lps = output_logprobs(out)
    ref_gen, ref_lps, _ = greedy(plain, PROMPT, N_NEW)
    return dict(gen=gen, lps=lps, ref_gen=ref_gen, ref_lps=ref_lps, metrics=out.outputs[0].spec_decode_metrics,
                decode_peak=decode_peak, peak=peak, start=start, end=free_blocks(spec))


def test_speculation_changes_no_token_and_matches_the_oracle(streamed, tiny_llama):
    gen = streamed["gen"]
    assert len(gen) == N_NEW
    assert gen == streamed["ref_gen"], \
        f"first difference at token {next(i for i, (a, b) in enumerate(zip(gen, streamed['ref_gen'])) if a != b)}"
    oracle = OracleLlama(tiny_llama, sink_tokens=S, window_tokens=W, block_size=BS)
    oracle_lp = oracle.logprobs(PROMPT + gen)
    check_greedy(oracle_lp, len(PROMPT), gen, streamed["lps"], TOL, "ngram speculation")
    check_greedy(oracle_lp, len(PROMPT), streamed["ref_gen"], streamed["ref_lps"], TOL, "no speculation")


def test_drafts_are_accepted_and_rejected_past_the_window(streamed):
    m = streamed["metrics"]  # vLLM's per-request spec decode metrics (detailed: per step)
    d = m.to_dict()
    print(f"\nngram k={K}: acceptance rate {d['draft_acceptance_rate']:.3f} "
          f"({d['num_accepted_draft_tokens']}/{d['num_draft_tokens']} drafts), mean acceptance length "
          f"{d['mean_acceptance_length']:.2f} over {d['num_spec_steps']} steps, histogram {d['acceptance_histogram']}")
    # Where each verification step's first query sits: the prompt, the first sampled token,
    # then each earlier step's accepted drafts + 1. Not every step drafts (no match: no
    # entry), so this undercounts positions: "past the window" below is conservative.
    pos, streaming = len(PROMPT) + 1, []
    for acc, drafted in zip(m.per_step_accepted, m.per_step_drafted):
        if pos > POLICY.dense_tokens:
            streaming.append((acc, drafted))
        pos += acc + 1
    assert sum(a for a, _ in streaming) > 0, "no draft accepted past the window"
    assert any(a < dr for a, dr in streaming), "no draft rejected past the window"
    assert any(a == dr for a, dr in streaming if dr), "no step accepted all its drafts past the window"


def test_blocks_bounded_for_a_speculative_step_and_all_returned(streamed, spec):
    # A verification step writes 1 + K tokens: the drafts may reach one block past the
    # window's current block, and never more (the gap is freed from the accepted count).
    bound = POLICY.max_live_blocks(1 + K)
    assert POLICY.max_live_blocks(1) <= streamed["decode_peak"] <= bound, streamed["decode_peak"]
    assert streamed["peak"] <= POLICY.max_live_blocks(200)  # the prompt's prefill chunk
    assert streamed["end"] == streamed["start"]  # every block back in the pool after finish
    # The policy's metrics report that bound for a decoding request (max_live_blocks).
    stats = engine_core(spec).scheduler.make_stats().streaming_sink
    assert stats["max_live_blocks"] == bound and stats["live_blocks"] == 0


def test_abort_mid_stream_with_drafts_returns_every_block(spec):
    start = free_blocks(spec)
    prompt = random_ids(40, seed=6) * 8  # 320 tokens: two prefill chunks, then drafts
    out, decode_peak, peak = _stream(spec, "abort", prompt, 4 * CONTEXT, abort_after=CONTEXT)
    assert CONTEXT <= len(out.outputs[0].token_ids) < 4 * CONTEXT  # aborted past the window
    assert decode_peak <= POLICY.max_live_blocks(1 + K) and peak <= POLICY.max_live_blocks(200)
    assert free_blocks(spec) == start
    assert not any(m.req_to_blocks for m in kv_manager(spec).coordinator.single_type_managers)


def test_a_resumed_stream_hits_the_cache_and_continues_it(streamed, spec):
    """Prefix caching with speculation: a prompt that is the stream's first 1500 tokens
    resumes from the cached sinks + window (the gap is never needed) and continues with
    the same tokens."""
    full = PROMPT + streamed["gen"]
    cut = 1500
    gen, _, cached = greedy(spec, full[:cut], 64)
    assert cached == (cut - 1) // BS * BS  # the last full block before the final prompt token
    assert gen == full[cut:cut + 64]
