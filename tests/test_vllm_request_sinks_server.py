"""Per-request sinks through the real OpenAI-compatible server (`vllm serve`, multi-process,
127.0.0.1), in `--sink-tokens system` mode (issue 23).

Tiny random Llama (256-token context), block 32, window 64, --max-sink-tokens 128, the
fallback 4. Each chat request's sinks are its rendered system turn; two sessions with other
system prompts run at the same time, ten turns each, to >= 8x the context; every answer is
the float64 oracle's, fed the whole history with S = that session's system turn length.
Bad ``vllm_xargs`` values get a 400 naming the field, and the server keeps serving.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import requests
import torch

from oracle import OracleLlama, check_greedy
from server_process import (REQUEST_TIMEOUT_S, free_port, running_server, served_model, streamed_past,
                            vllm_server_env)
from test_vllm_server import CHAT_TEMPLATE, LONG, VLLM, _scrape

from streaming_sink.policy import SinkPolicy

CONTEXT, BS, W, CAP, FALLBACK = 256, 32, 64, 128, 4
TOL = 2e-4
TURNS, USER_WORDS, REPLY = 10, 45, 48
WORDS = ("sea ship wind rain cold house road light stone river field dog cat bird tree green "
         "blue red small old new long time day night year hand eye word king").split()


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [VLLM, "serve", tiny_llama, "--host", "127.0.0.1", "--port", str(port),
           "--kv-policy", "streaming-sink", "--sink-tokens", f"system:{FALLBACK}",
           "--max-sink-tokens", str(CAP), "--sink-window", str(W), "--block-size", str(BS),
           "--max-model-len", str(LONG), "--dtype", "float32", "--max-num-batched-tokens", "256",
           "--enable-prompt-tokens-details", "--chat-template", CHAT_TEMPLATE, "--shutdown-timeout", "10"]
    with running_server(cmd, port, log, vllm_server_env(), timeout=600) as base:
        yield base, log


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _chat(base, model, messages, max_tokens=REPLY, **extra):
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 0, "return_token_ids": True, **extra}
    return requests.post(base + "/v1/chat/completions", json=body, timeout=600)


def _turn(base, model, messages, max_tokens=REPLY) -> dict:
    r = _chat(base, model, messages, max_tokens)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    messages.append({"role": "assistant", "content": choice["message"]["content"]})
    return {"prompt": body["prompt_token_ids"], "gen": choice["token_ids"],
            "lps": [c["logprob"] for c in choice["logprobs"]["content"]],
            "cached": (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0}


def _session(base, model, messages: list, seed: int, turns: int, out: list) -> None:
    rng = random.Random(seed)
    for _ in range(turns):
        messages.append({"role": "user", "content": _words(rng, USER_WORDS)})
        out.append(_turn(base, model, messages))


def _system_turn(tokenizer, prompt: list[int], system: str) -> int:
    """The system turn's tokens as the template renders it ("### system:\\n...\\n"), found
    independently of the server's rule: its own tokenization must start the prompt."""
    text = f"### system:\n{system}\n"
    for special in (True, False):
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        if prompt[:len(ids)] == ids:
            return len(ids)
    raise AssertionError("the system turn does not start the prompt")


def test_system_turn_sessions_equal_the_oracle(server, tiny_llama, tokenizer):
    """Two sessions at once (other system prompts, other S), ten turns each to >= 8x the
    context: every answer is the oracle's with S = its session's system turn; turns resume
    from the prefix cache; after turn 10 the system turn's blocks are still the pinned sinks, and the
    metrics quote the widest request's live-block bound."""
    base, log = server
    model = served_model(base)
    rng = random.Random(7)
    systems = [f"You are a ship's cook called Ada. Rules: {_words(rng, 14)}.",  # under the cap
               f"You are a gardener. {_words(rng, 4)}."]
    results: list[list] = [[], []]
    histories = [[{"role": "system", "content": s}] for s in systems]
    threads = [threading.Thread(target=_session, args=(base, model, histories[i], 100 + i, TURNS - 1, results[i]))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(r) == TURNS - 1 for r in results), "a session failed (see its assertion above)"

    # Turn 10 of session 0, alone (long enough to reach 8x the context).
    rng = random.Random(100 + 2 * TURNS)
    histories[0].append({"role": "user", "content": _words(rng, USER_WORDS)})
    results[0].append(_turn(base, model, histories[0], max_tokens=8 * REPLY))

    # One more turn of session 0, streamed and read in part, scraped while it surely runs
    # (it asks for minutes of tokens, far more than it gets before the scrape), then closed (aborted):
    # its pinned sink blocks are the system turn's (Sb of its S, not of the fallback 4).
    s0 = _system_turn(tokenizer, results[0][0]["prompt"], systems[0])
    probe = histories[0] + [{"role": "user", "content": _words(rng, USER_WORDS)}]
    body = {"model": model, "messages": probe, "max_tokens": LONG // 2, "temperature": 0, "ignore_eos": True}
    with streamed_past(base + "/v1/chat/completions", body, 16):  # past its prefill
        m = _scrape(base)
    assert m["vllm:streaming_sink_requests_past_window"] == 1, m
    assert m["vllm:streaming_sink_sink_blocks_pinned"] == -(-s0 // BS), (m, s0)
    assert -(-s0 // BS) > -(-FALLBACK // BS)
    # The live-block bound the metrics quote is the widest request's (S at the cap), not the
    # fallback's, which this session's request (Sb = its system turn's) would exceed.
    default = SinkPolicy(FALLBACK, W, BS)
    assert m["vllm:streaming_sink_max_live_blocks"] == default.with_sinks(CAP).max_live_blocks() \
        >= default.with_sinks(s0).max_live_blocks() > default.max_live_blocks(), (m, s0)

    for i, (system, turns) in enumerate(zip(systems, results)):
        S = _system_turn(tokenizer, turns[0]["prompt"], system)
        assert FALLBACK < S <= CAP and S % BS, S
        oracle = OracleLlama(tiny_llama, sink_tokens=S, window_tokens=W, block_size=BS)
        for k, t in enumerate(turns):
            assert _system_turn(tokenizer, t["prompt"], system) == S
            lp = oracle.logprobs(t["prompt"] + t["gen"])
            check_greedy(lp, len(t["prompt"]), t["gen"], torch.tensor(t["lps"], dtype=torch.float64), TOL,
                         f"session {i} turn {k + 1}")
            if k >= 1:  # resumed from the cache up to the previous prompt's last full block
                previous = len(turns[k - 1]["prompt"])
                assert t["cached"] >= previous // BS * BS - BS, (i, k, previous, t["cached"])
        last = turns[-1]
        assert len(last["prompt"]) + len(last["gen"]) >= 8 * CONTEXT
        if i == 0:  # not vacuous: the fallback S gives other numbers on this history
            four = OracleLlama(tiny_llama, sink_tokens=FALLBACK, window_tokens=W, block_size=BS)
            lp4 = four.logprobs(last["prompt"] + last["gen"])[len(last["prompt"]) - 1:-1]
            want4 = lp4.gather(1, torch.tensor(last["gen"])[:, None]).squeeze(1)
            assert (want4 - torch.tensor(last["lps"], dtype=torch.float64)).abs().max() > 1e-2


@pytest.mark.parametrize("value, words", [(-1, "must be >= 0"), (CAP + 1, "--max-sink-tokens 128"),
                                          ("8", "must be an integer"), (2.5, "must be an integer")])
def test_bad_sink_tokens_get_a_400_naming_the_field(server, value, words):
    base, _ = server
    model = served_model(base)
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "Once upon a time"})):
        r = requests.post(base + path, json={"model": model, "max_tokens": 4, **body,
                                             "vllm_xargs": {"sink_tokens": value}}, timeout=120)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "sink_tokens" in r.text and words in r.text, r.text
    ok = requests.post(base + "/v1/completions", json={"model": model, "prompt": "Once upon a time",
                                                       "max_tokens": 4, "vllm_xargs": {"sink_tokens": CAP}},
                       timeout=120)
    assert ok.status_code == 200, ok.text  # the engine is fine


def test_system_turn_longer_than_the_cap_is_capped_and_logged(server):
    base, log = server
    model = served_model(base)
    long_system = _words(random.Random(3), 120)  # far more than 128 tokens
    r = _chat(base, model, [{"role": "system", "content": long_system}, {"role": "user", "content": "hi"}], 8)
    assert r.status_code == 200, r.text
    deadline = time.time() + REQUEST_TIMEOUT_S
    while "longer than --max-sink-tokens 128" not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert "longer than --max-sink-tokens 128: its first 128 tokens are the request's sinks" in log.read_text()
