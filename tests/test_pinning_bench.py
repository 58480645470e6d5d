"""benchmarks/bench_system_prompt_pinning.py keeps its measurement honest (no server: the items,
the probe schedule and the scoring; the servers' side is the engine tests' and the run's own).

- every system prompt renders to the same number of tokens (a server-wide --sink-tokens pins all of
  them) and each candidate answer is one token;
- a Latin square: per fact, each candidate is the answer of exactly one system prompt, and a system
  prompt names only its own answer of each category;
- the filler (the book passages between the system prompt and the probes) never names a probe's
  correct answer, so the system prompt is the only source of it;
- the schedule reaches every depth target with whole turns, deeper targets never with fewer turns;
- forced-choice scoring, probability share, rank and greedy recall, and the Wilson interval.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

from assets import require_asset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import bench_system_prompt_pinning as bench  # noqa: E402
from chat_session import Tokens, system_turn_tokens  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from streaming_sink_tools import prepare

    t = require_asset("the embedded SmolLM2 tokenizer", prepare.load_tokenizer)
    t.model_max_length = 1 << 30
    return t


@pytest.fixture(scope="module")
def book():
    from streaming_sink_tools import prepare

    return require_asset("the Austen corpus", lambda: prepare.corpus_text("emma"))


def test_system_prompts_one_length_single_token_answers_latin_square(tok):
    prompts = bench.system_prompts(8)
    lengths = {system_turn_tokens(tok, p["system"]) for p in prompts}
    assert len(lengths) == 1, lengths
    ids = bench.candidate_ids(tok)  # exits unless every candidate is one distinct token
    for cat, (words, _, _) in bench.FACTS.items():
        assert len(ids[cat]) == len(words) == 8
        assert sorted(p["facts"][cat] for p in prompts) == sorted(words)  # each word the answer once
        for p in prompts:
            named = [w for w in words if re.search(rf"\b{w}\b", p["system"])]
            assert named == [p["facts"][cat]], (cat, named)


def test_filler_never_names_a_correct_answer_and_schedule_reaches_each_depth(tok, book):
    prompts = bench.system_prompts(3)
    depths = [0, 500, 2048, 4096]
    n = int(max(depths) / (0.8 * 300)) + 3
    filler = [bench.filler_turns(book, Tokens(tok), 300, n, skip=k * n) for k in range(3)]
    schedule = bench.plan(tok, prompts, filler, depths, deep_from=4096, deep_prompts=1)
    assert [len(rows) for rows in schedule] == [4, 3, 3]  # the deep target for the first prompt only
    for k, rows in enumerate(schedule):
        turns = [t for _, t in rows]
        assert turns == sorted(turns) and turns[0] == 0
        for d, t in rows:
            history = [{"role": "system", "content": prompts[k]["system"]}] + [m for pair in filler[k][:t] for m in pair]
            length = bench.rendered_len(tok, history)
            assert length >= d
            if t:  # one turn fewer would not reach it
                assert bench.rendered_len(tok, history[:-2]) < d
        text = " ".join(m["content"] for pair in filler[k][:turns[-1]] for m in pair)
        for cat in bench.FACTS:
            assert not re.search(rf"\b{prompts[k]['facts'][cat]}\b", text, flags=re.I), (k, cat)


def test_scoring():
    ids = list(range(100, 108))
    word = bench.FACTS["city"][0][2]
    lp = [-5.0] * 8
    lp[2] = -1.0
    rec = dict(logprobs=lp, sampled=ids[2])
    s = bench.score(rec, "city", word, ids)
    assert s["correct"] and s["rank"] == 1 and s["recall"]
    assert s["share"] == pytest.approx(1 / (1 + 7 * math.exp(-4.0)))
    lp[5] = -0.5  # a distractor ahead: wrong, rank 2; greedy picked some other token
    s = bench.score(dict(logprobs=lp, sampled=7), "city", word, ids)
    assert not s["correct"] and s["rank"] == 2 and not s["recall"]
    tie = bench.score(dict(logprobs=[-1.0] * 8, sampled=ids[2]), "city", word, ids)
    assert not tie["correct"] and tie["share"] == pytest.approx(1 / 8)  # a tie is no recall
    lo, hi = bench.wilson(8, 32)
    assert 0.12 < lo < 0.25 < hi < 0.43
    assert bench.wilson(0, 32)[0] == 0.0 and bench.wilson(32, 32)[1] == 1.0
