"""Drive the real vLLM engine in-process and read its own KV manager.

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs engine core + worker in this process,
so tests can read the scheduler's block pool and per-request block lists (the
server tests cover the multi-process path users run).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import vllm_sink  # noqa: E402,F401  (registers LLM(kv_policy=...) keywords)
from vllm import LLM, SamplingParams  # noqa: E402

S, W, BS = 4, 128, 32  # policy used across the engine tests (dense regime: 192 tokens)


def make_llm(model: str, policy: bool = True, **kwargs) -> LLM:
    args = dict(model=model, block_size=BS, dtype="float32", max_num_batched_tokens=200, seed=0)
    if policy:  # the stream may be far longer than the model's context
        args.update(kv_policy="streaming-sink", sink_tokens=S, sink_window=W, max_model_len=8192)
    args.update(kwargs)
    return LLM(**args)


# The engines of a test module, for the model its own ``model`` fixture names (a folder).
# Module-scoped on purpose: deleting an in-process vLLM engine tears down the process-wide
# distributed state (EngineCore.shutdown), which would break another engine still in use;
# with a parametrized ``model``, pytest runs one model's tests, then the next one's.

@pytest.fixture(scope="module")
def llm(model):
    """The policy engine (``make_llm`` defaults)."""
    engine = make_llm(model)
    yield engine
    del engine


@pytest.fixture(scope="module")
def stock(model, llm):
    """A policy-off engine in the same process, built after the policy engine."""
    engine = make_llm(model, policy=False)
    yield engine
    del engine


def random_ids(n: int, seed: int, vocab: int = 384) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, teacher-forced through the engine."""
    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       use_tqdm=False)
    plp = out[0].prompt_logprobs
    return torch.tensor([plp[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float64)


def greedy(llm: LLM, prompt: list[int], n: int):
    """One greedy request: (tokens, their logprobs, prompt tokens the engine served from its prefix cache)."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return (*output_logprobs(out), out.num_cached_tokens)


def output_logprobs(out) -> tuple[list[int], torch.Tensor]:
    gen = list(out.outputs[0].token_ids)
    return gen, torch.tensor([d[t].logprob for d, t in zip(out.outputs[0].logprobs, gen)], dtype=torch.float64)


# ---- the engine's own KV bookkeeping --------------------------------------

def engine_core(llm: LLM):
    return llm.llm_engine.engine_core.engine_core


def kv_manager(llm: LLM):
    return engine_core(llm).scheduler.kv_cache_manager


def free_blocks(llm: LLM) -> int:
    return kv_manager(llm).block_pool.get_num_free_blocks()


def run_stepwise_by_group(llm: LLM, requests: dict, groups, abort_at: dict | None = None, logprobs: bool = False):
    """Step the engine through ``requests`` ({id: (prompt ids, max_tokens)}), aborting
    ``abort_at`` ({id: after n tokens}); returns (per group kind the most blocks any request
    held after any step, the last output per request). ``groups``: [(kind, manager)]."""
    engine = llm.llm_engine
    for rid, (prompt, n) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, SamplingParams(
            max_tokens=n, temperature=0, ignore_eos=True, logprobs=0 if logprobs else None))
    peak = {k: 0 for k, _ in groups}
    final, abort_at = {}, dict(abort_at or {})
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
        for kind, m in groups:
            for blocks in m.req_to_blocks.values():
                peak[kind] = max(peak[kind], sum(not b.is_null for b in blocks))
        for rid, at in list(abort_at.items()):
            if rid in final and len(final[rid].outputs[0].token_ids) >= at:
                engine.abort_request([rid])
                del abort_at[rid]
    return peak, final


def live_blocks(llm: LLM) -> dict[str, int]:
    """Blocks each running request holds (not counting recycled null slots)."""
    counts: dict[str, int] = {}
    for manager in kv_manager(llm).coordinator.single_type_managers:
        for req_id, blocks in manager.req_to_blocks.items():
            counts[req_id] = counts.get(req_id, 0) + sum(not b.is_null for b in blocks)
    return counts


def assert_dense_equals_stock(llm: LLM, stock: LLM, dense_tokens: int) -> None:
    """Below the window the policy's engine is stock's (==): greedy tokens and logprobs of
    three prompts decoded up to the last dense position, and the prompt logprobs of a
    prompt of ``dense_tokens`` tokens (prefilled in chunks, every row dense)."""
    prompts = [random_ids(n, seed=20 + n) for n in (5, 64, 120)]
    params = SamplingParams(max_tokens=dense_tokens - 121, temperature=0, ignore_eos=True, logprobs=0)
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    theirs = stock.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for a, b in zip(ours, theirs):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        la = [d[t].logprob for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [d[t].logprob for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        assert la == lb
    ids = random_ids(dense_tokens, seed=7)
    assert torch.equal(prompt_logprobs(llm, ids), prompt_logprobs(stock, ids))
