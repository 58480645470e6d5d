"""SGLang features composed with --kv-policy streaming-sink, past the window
(docs/compatibility.md): n>1 sampling, stop strings, top-k logprobs, structured outputs
(json_schema, regex, EBNF choice; SGLang's xgrammar backend).

One policy engine (tests/sglang/sglang_helpers.py: S=4, W=64, page size 1, so dense below
token 69) on the tiny random Llama with a 128-token context; every prompt here is 150
tokens, so each request decodes in the streaming regime past the model's context, with the
window's old slots back in SGLang's allocator. Outputs are checked against the float64 oracle
(tests/oracle.py) or, where the output is a structure, against the structure and the policy's
own plain greedy stream. Below the window the policy is stock SGLang (test_sglang_stock.py).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from oracle import OracleLlama
from sglang_helpers import TOL, S, W, engine_args, random_ids

PAST = 150


@pytest.fixture(scope="module")
def engine(tiny_llama_128):
    import sglang

    # JSON without free whitespace (a server setting; the random model would otherwise fill
    # max_new_tokens with whitespace, which the grammar allows)
    eng = sglang.Engine(**engine_args(tiny_llama_128, constrained_json_disable_any_whitespace=True))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def oracle(tiny_llama_128):
    return OracleLlama(tiny_llama_128, sink_tokens=S, window_tokens=W, block_size=1)


def text_ids(engine, n: int, seed: int) -> list[int]:
    """``n`` prompt tokens of ASCII words (tests that read output text: no partial UTF-8
    bytes of a random prompt for the detokenizer to carry into the output)."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    text = "".join(letters[i] for i in torch.randint(len(letters), (8 * n,), generator=g).tolist())
    ids = engine.tokenizer_manager.tokenizer.encode(text)
    assert len(ids) >= n
    return ids[:n]


def test_n_samples(engine, oracle):
    """n=3 samples at temperature 1 (logprobs are then the model's own): each sample's
    tokens carry the oracle's logprobs, and the samples differ."""
    past = random_ids(PAST, seed=21)
    outs = engine.generate(input_ids=[past], sampling_params={
        "n": 3, "temperature": 1.0, "max_new_tokens": 60, "ignore_eos": True, "sampling_seed": 5},
        return_logprob=True)
    assert len(outs) == 3
    gens = []
    for i, out in enumerate(outs):
        lp = out["meta_info"]["output_token_logprobs"]
        gen = [t for _, t, _ in lp]
        got = torch.tensor([x for x, _, _ in lp], dtype=torch.float64)
        want = oracle.logprobs(past + gen)[PAST - 1:-1].gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        assert (got - want).abs().max().item() < TOL, f"sample {i}"
        gens.append(tuple(gen))
    assert len(set(gens)) == 3


def test_top_logprobs(engine, oracle):
    """Top-5 logprobs of every decoded token equal the oracle's (values; ids where no near-tie)."""
    k, past = 5, random_ids(PAST, seed=22)
    out = engine.generate(input_ids=[past], sampling_params={"max_new_tokens": 60, "temperature": 0,
                                                             "ignore_eos": True},
                          return_logprob=True, top_logprobs_num=k)[0]
    gen = [t for _, t, _ in out["meta_info"]["output_token_logprobs"]]
    ref = oracle.logprobs(past + gen)
    for step, tops in enumerate(out["meta_info"]["output_top_logprobs"]):
        want = ref[PAST - 1 + step]
        assert len(tops) == k
        for lp, tok, _ in tops:
            assert abs(lp - want[tok].item()) < TOL, (step, tok)
        top = want.topk(k + 1)
        if (top.values[k - 1] - top.values[k]).item() > 1e-3:
            assert {t for _, t, _ in tops} == set(top.indices[:k].tolist()), step


def test_stop_strings(engine):
    """A stop string from the second half of a greedy stream ends it at its first occurrence."""
    past = text_ids(engine, PAST, seed=23)
    params = {"max_new_tokens": 80, "temperature": 0, "ignore_eos": True}
    text = engine.generate(input_ids=[past], sampling_params=params)[0]["text"]
    cut = next(i for i in range(len(text) // 2, len(text) - 3) if text[i:i + 3].isascii() and text[i:i + 3].isprintable())
    stop = text[cut:cut + 3]
    out = engine.generate(input_ids=[past], sampling_params={**params, "stop": [stop]})[0]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert out["text"] == text[:text.find(stop)]


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"], "additionalProperties": False}
REGEX = r"[a-z]{4}-[0-9]{3}-(yes|no)"
GRAMMARS = {
    "json_schema": ({"json_schema": json.dumps(SCHEMA)}, lambda t: json.loads(t).keys() == SCHEMA["properties"].keys()),
    "regex": ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
    "choice": ({"ebnf": 'root ::= "streaming" | "sink" | "window"'}, lambda t: t in ("streaming", "sink", "window")),
}


@pytest.mark.parametrize("kind", list(GRAMMARS))
def test_structured_outputs(engine, kind):
    """Greedy under a grammar, decoded past the window: the output is the grammar's."""
    so, valid = GRAMMARS[kind]
    prompts = [text_ids(engine, PAST, seed=24), text_ids(engine, PAST + 20, seed=25)]
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 120, "temperature": 0, **so})
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", f"{kind}: {out['text']!r}"
        assert valid(out["text"]), f"{kind}: {out['text']!r}"
