"""The policy's metrics in SGLang's own Prometheus endpoint: a real ``launch_server`` with
``--kv-policy streaming-sink --enable-metrics``, two streams past S + W, ``/metrics``
scraped while they run and after; every value is the one the policy implies
(``SinkPolicy``), exactly."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import requests

from conftest import CONTEXT
from server_process import REQUEST_TIMEOUT_S, free_port, running_server
from sglang_helpers import CHUNK, S, W, launch_server_cmd, random_ids

from streaming_sink.metric_names import metric_name
from streaming_sink.policy import SinkPolicy

POLICY = SinkPolicy(S, W, 1)
# The core's names (streaming_sink/metric_names.py), SGLang's unit: tokens.
PAST, PINNED, LIVE, MAX_LIVE, PEAK = (metric_name("sglang", k) for k in (
    "requests_past_window", "sinks_pinned", "live", "max_live", "request_peak"))
RECYCLED = metric_name("sglang", "recycled") + "_total"


@pytest.fixture(scope="module")
def server(tiny_llama_128, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server-metrics") / "server.log"
    cmd = launch_server_cmd(tiny_llama_128, port, "--enable-metrics")
    with running_server(cmd, port, log, dict(os.environ), timeout=600) as base:
        yield base


def scrape(base: str) -> dict[str, list[tuple[dict, float]]]:
    """``/metrics`` as {sample name: [(labels, value), ...]}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict, float]]] = {}
    text = requests.get(base + "/metrics", timeout=REQUEST_TIMEOUT_S).text
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
    assert (PAST, PINNED, LIVE, RECYCLED, PEAK) == (
        "sglang:streaming_sink_requests_past_window", "sglang:streaming_sink_sink_tokens_pinned",
        "sglang:streaming_sink_live_tokens", "sglang:streaming_sink_recycled_tokens_total",
        "sglang:streaming_sink_request_live_tokens")
    names = (PAST, PINNED, LIVE, RECYCLED, PEAK + "_count", PEAK + "_sum")
    # SGLang's own label set (scheduler metrics), on every series of ours.
    sglang_labels = before["sglang:num_running_reqs"][0][0]
    for name in names:
        assert [labels for labels, _ in before[name]] == [sglang_labels], name
        assert value(before, name) == 0
    assert value(before, MAX_LIVE) == S + W + 1  # the policy's bound for a decoding request
    buckets = {labels["le"] for labels, _ in before[PEAK + "_bucket"]}
    assert {f"{float(S + W)}", f"{float(S + W + 1)}", f"{float(S + W + CHUNK)}"} <= buckets

    # A: a long stream, started first; B: a shorter one streamed beside it.
    # Once B starts, A has ~800 more steps to go than B: the overlap survives a slow start of B
    # under load (with 5 * CONTEXT it was lost once, at load average ~5).
    a_ids, a_new = random_ids(20, seed=31), 10 * CONTEXT
    b_ids, b_new = random_ids(30, seed=32), 3 * CONTEXT
    result = {}
    thread = threading.Thread(target=lambda: result.update(a=generate(base, a_ids, a_new).json()))
    thread.start()
    try:
        first = until(base, lambda s: value(s, PAST) >= 1)
        assert value(first, PAST) == 1  # A alone, past the window
        assert value(first, PINNED) == S
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
        assert value(during, PAST) == 2
        assert value(during, PINNED) == 2 * S
        assert value(during, LIVE) == 2 * (S + W)  # each: its sinks and window, before a step's allocation
        assert value(during, RECYCLED) > 0
        # B released, A still streaming.
        after_b = until(base, lambda s: value(s, PEAK + "_count") >= 1)
        assert "a" not in result, "A finished before B: the test lost its overlap"
        assert value(after_b, PAST) == 1
        assert value(after_b, PINNED) == S
        assert value(after_b, PEAK + "_count") == 1
        # A decode past the window holds S + W slots before a step, S + W + 1 with its new token.
        assert value(after_b, PEAK + "_sum") == S + W + 1
    finally:
        thread.join()
    assert result["a"]["meta_info"]["completion_tokens"] == a_new
    after = until(base, lambda s: value(s, PEAK + "_count") >= 2
                  and value(s, PAST) == 0)
    assert value(after, PAST) == 0
    assert value(after, PINNED) == 0
    assert value(after, LIVE) == 0
    assert value(after, PEAK + "_count") == 2
    assert value(after, PEAK + "_sum") == 2 * (S + W + 1)
    want = recycled_by(len(a_ids), a_new) + recycled_by(len(b_ids), b_new)
    print(f"recycled: {value(after, RECYCLED):.0f} (policy: {want})")
    assert value(after, RECYCLED) == want
    # The tokenizer process's own series (labelled on first use) still reach /metrics:
    # our early hook did not break SGLang's multiprocess mode.
    assert sum(v for _, v in after["sglang:generation_tokens_total"]) == a_new + b_new
    # Both observations in the S + W + 1 bucket, none below it.
    le = {labels["le"]: v for labels, v in after[PEAK + "_bucket"]}
    assert le[f"{float(S + W)}"] == 0 and le[f"{float(S + W + 1)}"] == 2
    text = requests.get(base + "/metrics", timeout=REQUEST_TIMEOUT_S).text
    print("\n".join(line for line in text.splitlines() if "streaming_sink" in line))
