"""`--sink-tokens system` through the offline API, ``LLM.chat`` (issue 23), in the real vLLM
CPU engine, against the float64 oracle.

Tiny random Llama (256-token context), block 32, window 64, --max-sink-tokens 128, the
fallback 4: ``LLM(..., sink_tokens="system:4").chat`` with four conversations in one
batch -- two system prompts of other lengths (neither a multiple of the block), one longer
than the cap, and one without a system message -- each over 3x the context. Every prompt
logprob must be the oracle's with S = that conversation's system turn as the template
renders it (found here independently of the hook) up to the cap, or the fallback without one.
"""

from __future__ import annotations

import random

import pytest
import torch

from oracle import OracleLlama
from test_vllm_request_sinks_server import _system_turn, _words as _words_from
from test_vllm_server import CHAT_TEMPLATE
from vllm_helpers import SamplingParams, make_llm

CONTEXT, BS, W, CAP, FALLBACK = 256, 32, 64, 128, 4
TOL = 2e-4


@pytest.fixture(scope="module")
def model(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def llm(model):
    engine = make_llm(model, block_size=BS, sink_tokens=f"system:{FALLBACK}", sink_window=W,
                      max_sink_tokens=CAP, max_num_batched_tokens=256)
    yield engine
    del engine


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _words(seed: int, n: int) -> str:
    return _words_from(random.Random(seed), n)


def test_llm_chat_pins_each_conversations_system_turn(llm, model, tokenizer):
    systems = [_words(1, 3), _words(2, 12), _words(3, 50), None]
    conversations = [([{"role": "system", "content": s}] if s else [])
                     + [{"role": "user", "content": _words(10 + i, CONTEXT)}] for i, s in enumerate(systems)]
    shared = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.chat(conversations, shared, chat_template=CHAT_TEMPLATE, use_tqdm=False)
    assert shared.extra_args is None, "the caller's SamplingParams were changed"
    sinks = []
    for system, out in zip(systems, outs):
        ids = out.prompt_token_ids
        assert len(ids) > 3 * CONTEXT
        s = FALLBACK if system is None else min(_system_turn(tokenizer, ids, system), CAP)
        sinks.append(s)
        got = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))],
                           dtype=torch.float64)
        want = OracleLlama(model, sink_tokens=s, window_tokens=W, block_size=BS).token_logprobs(ids)
        diff = (got - want).abs()
        assert diff.max().item() < TOL, f"S={s}: max |engine - oracle| {diff.max():.3g} at {diff.argmax() + 1}"
        if system is not None:  # not vacuous: the fallback S gives other numbers on this stream
            fallback = OracleLlama(model, sink_tokens=FALLBACK, window_tokens=W, block_size=BS)
            assert (fallback.token_logprobs(ids) - want).abs().max() > 1e-2
    assert sinks[0] != sinks[1] and all(s % BS for s in sinks[:2]) and sinks[2:] == [CAP, FALLBACK], sinks
    assert _system_turn(tokenizer, outs[2].prompt_token_ids, systems[2]) > CAP


def test_llm_chat_keeps_a_conversations_own_sink_tokens(llm, model, tokenizer):
    """A conversation whose params carry sink_tokens keeps them (as vllm_xargs on the endpoint)."""
    conversation = [{"role": "system", "content": _words(4, 8)},
                    {"role": "user", "content": _words(5, CONTEXT)}]
    own = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, extra_args={"sink_tokens": 9})
    (out,) = llm.chat([conversation], [own], chat_template=CHAT_TEMPLATE, use_tqdm=False)
    ids = out.prompt_token_ids
    assert _system_turn(tokenizer, ids, conversation[0]["content"]) != 9
    got = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float64)
    want = OracleLlama(model, sink_tokens=9, window_tokens=W, block_size=BS).token_logprobs(ids)
    assert (got - want).abs().max().item() < TOL
