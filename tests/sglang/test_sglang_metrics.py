"""The policy's metrics in SGLang's own Prometheus endpoint: a real ``launch_server`` with
``--kv-policy streaming-sink --enable-metrics``, two streams past S + W, ``/metrics``
scraped while they run and after; every value is the one the policy implies
(``SinkPolicy``), exactly."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
import requests

from conftest import CONTEXT
from server_process import free_port, running_server
from sglang_helpers import CHUNK, S, W, random_ids

from streaming_sink.policy import SinkPolicy

POLICY = SinkPolicy(S, W, 1)
P = "sglang:streaming_sink_"


@pytest.fixture(scope="module")
def server(tiny_llama_128, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server-metrics") / "server.log"
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_llama_128,
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
           "--kv-policy", "streaming-sink", "--sink-tokens", str(S), "--sink-window", str(W),
           "--max-total-tokens", "2048", "--chunked-prefill-size", str(CHUNK), "--context-length", "16384",
           "--max-running-requests", "8", "--skip-server-warmup", "--enable-metrics"]
    with running_server(cmd, port, log, dict(os.environ), timeout=300) as base:
        yield base


def scrape(base: str) -> dict[str, list[tuple[dict, float]]]:
    """``/metrics`` as {sample name: [(labels, value), ...]}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict, float]]] = {}
    text = requests.get(base + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict, name: str) -> float:
    series = samples.get(name, [])
    assert len(series) == 1, f"{name}: {series}"
    return series[0][1]


def until(base: str, cond, timeout: float = 120) -> dict:
    """Scrape until ``cond(samples)`` holds (a request's release lands a moment after its
    last token); returns the last scrape either way, for the exact assertions."""
    deadline = time.time() + timeout
    while True:
        samples = scrape(base)
        if cond(samples) or time.time() > deadline:
            return samples
        time.sleep(0.2)


def recycled_by(prompt: int, new: int) -> int:
    """Slots the window left behind for a request of ``prompt`` + ``new`` tokens: its last
    step runs with ``prompt + new - 2`` tokens in the cache, and everything between the
    sinks and that step's window went back (``SinkPolicy.freeable_prefix_blocks``)."""
    return len(POLICY.freeable_prefix_blocks(prompt + new - 2)) * POLICY.block_size


def generate(base: str, ids: list[int], n: int, stream: bool = False):
    body = {"input_ids": ids, "stream": stream,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}}
    return requests.post(base + "/generate", json=body, stream=stream, timeout=900)


def test_metrics_follow_the_policy(server):
    base = server
    before = scrape(base)
    names = ("num_past_window_reqs", "pinned_sink_tokens", "recycled_tokens_total",
             "live_kv_tokens_histogram_count", "live_kv_tokens_histogram_sum")
    # SGLang's own label set (scheduler metrics), on every series of ours.
    sglang_labels = before["sglang:num_running_reqs"][0][0]
    for name in names:
        assert [labels for labels, _ in before[P + name]] == [sglang_labels], name
        assert value(before, P + name) == 0
    buckets = {labels["le"] for labels, _ in before[P + "live_kv_tokens_histogram_bucket"]}
    assert {f"{float(S + W)}", f"{float(S + W + 1)}", f"{float(S + W + CHUNK)}"} <= buckets

    # A: a long stream, started first; B: a shorter one streamed beside it.
    a_ids, a_new = random_ids(20, seed=31), 5 * CONTEXT
    b_ids, b_new = random_ids(30, seed=32), 3 * CONTEXT
    result = {}
    thread = threading.Thread(target=lambda: result.update(a=generate(base, a_ids, a_new).json()))
    thread.start()
    try:
        first = until(base, lambda s: value(s, P + "num_past_window_reqs") >= 1)
        assert value(first, P + "num_past_window_reqs") == 1  # A alone, past the window
        assert value(first, P + "pinned_sink_tokens") == S
        during, got = None, 0
        with generate(base, b_ids, b_new, stream=True) as resp:
            assert resp.status_code == 200, resp.text
            for line in resp.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                got = json.loads(line[6:])["meta_info"]["completion_tokens"]
                if during is None and got >= 2 * (S + W):  # B past the window too; A ahead of it
                    during = scrape(base)
        assert got == b_new
        # Both past the window: each pins its S sinks.
        assert value(during, P + "num_past_window_reqs") == 2
        assert value(during, P + "pinned_sink_tokens") == 2 * S
        assert value(during, P + "recycled_tokens_total") > 0
        # B released, A still streaming.
        after_b = until(base, lambda s: value(s, P + "live_kv_tokens_histogram_count") >= 1)
        assert "a" not in result, "A finished before B: the test lost its overlap"
        assert value(after_b, P + "num_past_window_reqs") == 1
        assert value(after_b, P + "pinned_sink_tokens") == S
        assert value(after_b, P + "live_kv_tokens_histogram_count") == 1
        # A decode past the window holds S + W slots before a step, S + W + 1 with its new token.
        assert value(after_b, P + "live_kv_tokens_histogram_sum") == S + W + 1
    finally:
        thread.join()
    assert result["a"]["meta_info"]["completion_tokens"] == a_new
    after = until(base, lambda s: value(s, P + "live_kv_tokens_histogram_count") >= 2
                  and value(s, P + "num_past_window_reqs") == 0)
    assert value(after, P + "num_past_window_reqs") == 0
    assert value(after, P + "pinned_sink_tokens") == 0
    assert value(after, P + "live_kv_tokens_histogram_count") == 2
    assert value(after, P + "live_kv_tokens_histogram_sum") == 2 * (S + W + 1)
    want = recycled_by(len(a_ids), a_new) + recycled_by(len(b_ids), b_new)
    print(f"recycled: {value(after, P + 'recycled_tokens_total'):.0f} (policy: {want})")
    assert value(after, P + "recycled_tokens_total") == want
    # The tokenizer process's own series (labelled on first use) still reach /metrics:
    # our early hook did not break SGLang's multiprocess mode.
    assert sum(v for _, v in after["sglang:generation_tokens_total"]) == a_new + b_new
    # Both observations in the S + W + 1 bucket, none below it.
    le = {labels["le"]: v for labels, v in after[P + "live_kv_tokens_histogram_bucket"]}
    assert le[f"{float(S + W)}"] == 0 and le[f"{float(S + W + 1)}"] == 2
    text = requests.get(base + "/metrics", timeout=10).text
    print("\n".join(line for line in text.splitlines() if "streaming_sink" in line))
