"""Per-request sink lengths on SGLang (issue 23; sglang_sink/frontend.py, docs/sglang.md).

Tiny random Llama, context 128, page size 1, window W = 32, server default S = 4,
``--max-sink-tokens 64`` (so S + W <= 96 fits the 128-position rotary table). A request asks
for its own S with SGLang's ``custom_params`` (``{"sink_tokens": N}``):

* the real ``sglang.Engine``: one batch of requests with S = 0, 13, 48 (past the window) and
  the server's default beside them, every stream 8x the context: greedy decodes and
  teacher-forced prompt logprobs equal the oracle with each request's own S; before each
  step's allocation a request past its window holds exactly its own ``S + W`` slots; the
  radix cache shares slots only between requests with the same S;
* the stock HTTP server (``launch_server --sink-tokens system:4``) with a chat template: bad
  values get a 400 naming the field; two concurrent chat sessions with different system
  prompts, each >= 8x the context, whose replies equal the oracle fed the whole history with
  S = the tokens of that session's system turn, served from the radix cache turn after turn.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid

import pytest
import requests
import torch

from conftest import CONTEXT
from oracle import OracleLlama
from server_process import free_port, running_server
from sglang_helpers import CHUNK, TOL, Trace, check_oracle, decoded, engine_args, flush, launch_server_cmd, \
    random_ids, trace_path

from streaming_sink.policy import SinkPolicy

DEFAULT_S, W, CAP = 4, 32, 64
POLICY = SinkPolicy(DEFAULT_S, W, 1)
# One batch: the server's default (no field), S = 0, an S that is no round number, S > W.
SINKS = (None, 0, 13, 48)


def own(s: int | None) -> int:
    return DEFAULT_S if s is None else s


def sampling(s: int | None, n: int) -> dict:
    params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    if s is not None:
        params["custom_params"] = {"sink_tokens": s}
    return params


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return Trace(trace_path(tmp_path_factory))


@pytest.fixture(scope="module")
def engine(tiny_llama_128, trace):
    import sglang

    eng = sglang.Engine(**engine_args(tiny_llama_128, sink_window=W, max_sink_tokens=CAP))
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def oracles(tiny_llama_128):
    cache = {}

    def get(s: int) -> OracleLlama:
        if s not in cache:
            cache[s] = OracleLlama(tiny_llama_128, sink_tokens=s, window_tokens=W, block_size=1)
        return cache[s]

    return get


def generate(engine, prompts, sinks, n, rids=None):
    """One batch; (tokens, logprobs, cached prompt tokens) per request."""
    return decoded(engine.generate(input_ids=prompts, sampling_params=[sampling(s, n) for s in sinks],
                                   return_logprob=True, rid=rids))


@pytest.fixture(scope="module")
def mixed_decode(engine, trace):
    """One batch of greedy streams, 8x the context each, every request with its own S."""
    trace.clear()
    prompts = [random_ids(n, seed=200 + n) for n in (37, 300, 150, 240)]
    rids = [f"sinks-{own(s)}-{uuid.uuid4().hex[:8]}" for s in SINKS]
    outs = generate(engine, prompts, SINKS, 8 * CONTEXT, rids)
    return prompts, rids, outs, trace.records()


def test_mixed_sink_lengths_in_one_batch_match_the_oracle(mixed_decode, oracles):
    prompts, _, outs, records = mixed_decode
    # They ran together: most decode steps hold all four requests.
    assert sum(len(r["step"]) == len(SINKS) for r in records) > 6 * CONTEXT
    for s, prompt, (gen, got, _) in zip(SINKS, prompts, outs):
        assert len(gen) == 8 * CONTEXT
        diff = check_oracle(oracles(own(s)), prompt, gen, got, f"S={own(s)}")
        print(f"S={own(s)}: prompt {len(prompt)} + {len(gen)}: max |engine - oracle| = {diff:.3g}")
    # Not vacuous: another S computes another stream (here the default's vs S = 13's).
    prompt, (gen, _, _) = prompts[2], outs[2]
    a = oracles(13).token_logprobs(prompt + gen[:200])
    b = oracles(DEFAULT_S).token_logprobs(prompt + gen[:200])
    assert (a - b).abs().max() > 1e-2


def test_each_request_holds_its_own_sinks_and_window(mixed_decode):
    _, rids, _, records = mixed_decode
    for s, rid in zip(SINKS, rids):
        held = [r["step"][rid] for r in records if rid in r["step"]]
        bound = POLICY.with_sinks(own(s)).max_live_blocks(CHUNK)  # S + W + 1 + a prefill chunk
        print(f"S={own(s)}: peak {max(held)} slots before a step's allocation (S + W = {own(s) + W})")
        # Before a step allocates, a request past its window holds exactly its own S + W.
        assert max(held) == own(s) + W and max(held) + CHUNK <= bound
        assert held[-1] == own(s) + W
    together = [r for r in records if len(r["step"]) == len(SINKS)]
    assert all(r["used"] == sum(r["step"].values()) + r["tree"] for r in together)


def test_mixed_sink_lengths_prompt_logprobs_match_the_oracle(engine, oracles):
    prompts = [random_ids(8 * CONTEXT, seed=300 + i) for i in range(len(SINKS))]
    outs = engine.generate(input_ids=prompts, sampling_params=[sampling(s, 1) for s in SINKS],
                           return_logprob=True, logprob_start_len=0)
    for s, ids, out in zip(SINKS, prompts, outs):
        lp = out["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in lp] == ids
        got = torch.tensor([x for x, _, _ in lp[1:]], dtype=torch.float64)
        diff = (got - oracles(own(s)).token_logprobs(ids)).abs()
        print(f"S={own(s)} prompt logprobs, {len(ids)} tokens: max |engine - oracle| = {diff.max():.3g}")
        assert diff.max().item() < TOL, f"S={own(s)}: max diff {diff.max():.3g} at token {diff.argmax() + 1}"


def test_radix_cache_shares_slots_only_between_equal_sink_lengths(engine, oracles):
    """SGLang's tree never shares nodes across extra keys; a request whose S is not the
    server's has S in its extra key, so a prefix is served from the cache only to a
    request whose positions agree, and then equals the oracle."""
    flush(engine)
    first = random_ids(200, seed=400)
    [(gen, got, cached)] = generate(engine, [first], [13], 60)
    assert cached == 0
    check_oracle(oracles(13), first, gen, got, "S=13, turn 1")
    follow = first + gen + random_ids(50, seed=401)
    replies = {}
    for s in (None, 0, 48):  # other positions: nothing of S = 13's prefix is theirs
        [(g, lp, cached)] = generate(engine, [follow], [s], 20)
        assert cached == 0, f"S={own(s)} was served {cached} tokens cached by an S=13 request"
        check_oracle(oracles(own(s)), follow, g, lp, f"S={own(s)} after S=13")
        replies[s] = g
    [(g, lp, cached)] = generate(engine, [follow], [13], 60)  # the same S: served from the cache
    assert cached == len(first) + len(gen) - 1
    check_oracle(oracles(13), follow, g, lp, "S=13, turn 2")
    again = follow + replies[None] + random_ids(50, seed=402)  # the default's own namespace as before
    [(g2, lp2, cached)] = generate(engine, [again], [None], 20)
    assert cached == len(follow) + 20 - 1
    check_oracle(oracles(DEFAULT_S), again, g2, lp2, "default S, cached")


def test_bad_values_refused_in_process(engine):
    for bad in (CAP + 1, -1, "8", 2.5, True):
        with pytest.raises(ValueError, match="sink_tokens"):
            engine.generate(input_ids=[[5, 6, 7]], sampling_params=sampling(bad, 2))
    [(gen, _, _)] = generate(engine, [[5, 6, 7]], [CAP], 2)  # the cap itself is fine; still serving
    assert len(gen) == 2


# ---- the HTTP server, --sink-tokens system ---------------------------------------------------

# ChatML, rendered by SGLang from the tokenizer's template (the tiny tokenizer has none).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM_A = "You are Ada, a careful assistant. Be brief."  # 57 tokens rendered (the tiny byte-level BPE)
SYSTEM_B = "Reply like a pirate."  # 39 tokens rendered
TURNS, REPLY = 10, 48


@pytest.fixture(scope="module")
def chat_model(tiny_llama_128, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_llama_128, path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(path)


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = launch_server_cmd(chat_model, port, "--max-sink-tokens", str(CAP), sink_tokens=f"system:{DEFAULT_S}",
                            sink_window=W)
    # 600 s: a loaded 2-core runner took > 300 s to start this server once
    with running_server(cmd, port, log, dict(os.environ), timeout=600) as base:
        yield base


def test_bad_values_get_a_400_naming_the_field(server):
    completion = {"model": "default", "prompt": "Once upon a time", "max_tokens": 2}
    chat = {"model": "default", "max_tokens": 2, "messages": [{"role": "system", "content": SYSTEM_B},
                                                              {"role": "user", "content": "Hello"}]}
    for body, url in ((completion, "/v1/completions"), (chat, "/v1/chat/completions")):
        for bad in (CAP + 1, -1, "8", 2.5, True):
            resp = requests.post(server + url, json={**body, "custom_params": {"sink_tokens": bad}}, timeout=60)
            assert resp.status_code == 400, (url, bad, resp.text)
            message = resp.json()["message"] if "message" in resp.json() else resp.text
            assert "sink_tokens" in message and "\n" not in message.strip(), message
        assert "--max-sink-tokens" in requests.post(
            server + url, json={**body, "custom_params": {"sink_tokens": CAP + 1}}, timeout=60).text
        ok = requests.post(server + url, json={**body, "custom_params": {"sink_tokens": 7}}, timeout=120)
        assert ok.status_code == 200, ok.text  # and the server still serves


def _chat(base: str, messages: list[dict]) -> dict:
    body = {"model": "default", "messages": messages, "max_tokens": REPLY, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "return_token_ids": True, "return_meta_info": True}
    resp = requests.post(base + "/v1/chat/completions", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return {"prompt": choice["prompt_token_ids"], "gen": choice["response_token_ids"],
            "logprobs": torch.tensor([c["logprob"] for c in choice["logprobs"]["content"]], dtype=torch.float64),
            "cached": choice["meta_info"]["cached_tokens"], "text": choice["message"]["content"]}


def _session(base: str, system: str, seed: int, out: list) -> None:
    messages = [{"role": "system", "content": system}]
    for turn in range(TURNS):
        words = " ".join(f"w{x}" for x in random_ids(40, seed=seed + turn))  # a message of ~80 tokens
        messages.append({"role": "user", "content": f"Turn {turn}: {words}"})
        reply = _chat(base, messages)
        out.append(reply)
        messages.append({"role": "assistant", "content": reply["text"]})


def _system_turn(chat_model: str, system: str, prompt: list[int]) -> int:
    """S the session must have: the tokens of its system turn as rendered by the template,
    a prefix of the prompt (with the tokenizer's BOS when the prompt has it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    text = tok.apply_chat_template([{"role": "system", "content": system}], tokenize=False,
                                   add_generation_prompt=False)
    ids = tok(text, add_special_tokens=prompt[:1] == [tok.bos_token_id])["input_ids"]
    assert prompt[:len(ids)] == ids, "the system turn is not a token prefix of the prompt"
    return len(ids)


def test_system_turn_as_the_sinks_in_two_concurrent_chat_sessions(server, chat_model, tiny_llama_128):
    sessions = {SYSTEM_A: [], SYSTEM_B: []}
    threads = [threading.Thread(target=_session, args=(server, system, 1000 * (i + 1), out))
               for i, (system, out) in enumerate(sessions.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(out) == TURNS for out in sessions.values()), "a session failed (see the assertion above)"
    sinks = {system: _system_turn(chat_model, system, out[0]["prompt"]) for system, out in sessions.items()}
    assert sinks[SYSTEM_A] != sinks[SYSTEM_B] and max(sinks.values()) <= CAP
    for system, out in sessions.items():
        s = sinks[system]
        oracle = OracleLlama(tiny_llama_128, sink_tokens=s, window_tokens=W, block_size=1)
        last = out[-1]
        assert len(last["prompt"]) + len(last["gen"]) >= 8 * CONTEXT
        # One oracle pass over each history that a later turn does not extend.
        worst, computed = 0.0, []
        for i in reversed(range(TURNS)):
            ids = out[i]["prompt"] + out[i]["gen"]
            lp = next((lp for full, lp in computed if full[:len(ids)] == ids), None)
            if lp is None:
                lp = oracle.logprobs(ids)
                computed.append((ids, lp))
            n = len(out[i]["prompt"])
            want = lp[n - 1:n - 1 + REPLY].gather(1, torch.tensor(out[i]["gen"])[:, None]).squeeze(1)
            worst = max(worst, (out[i]["logprobs"] - want).abs().max().item())
            assert worst < TOL, f"system turn {s} tokens, turn {i}: max |engine - oracle| {worst:.3g}"
        print(f"session with a {s}-token system turn: {TURNS} turns, {len(last['prompt']) + REPLY} tokens at the end, "
              f"max |engine - oracle| = {worst:.3g}, cached per turn {[r['cached'] for r in out]}")
        # Every later turn is served from the radix cache, the system turn (its sinks) at least.
        assert out[0]["cached"] == 0  # the other session's S differs: not even "<s><|im_start|>" is shared
        assert all(r["cached"] >= s for r in out[1:])
    # Not vacuous: with the server's fallback S the last turn of session A is another stream.
    a = sessions[SYSTEM_A][-1]
    fallback = OracleLlama(tiny_llama_128, sink_tokens=DEFAULT_S, window_tokens=W, block_size=1)
    lp = fallback.logprobs(a["prompt"] + a["gen"])[len(a["prompt"]) - 1:-1]
    want = lp.gather(1, torch.tensor(a["gen"])[:, None]).squeeze(1)
    assert (a["logprobs"] - want).abs().max() > 1e-2
    # Another session with A's system prompt shares its slots from its first turn on.
    reply = _chat(server, [{"role": "system", "content": SYSTEM_A}, {"role": "user", "content": "Hi there"}])
    assert reply["cached"] >= sinks[SYSTEM_A]
