"""The real SGLang HTTP server on 127.0.0.1, started with the stock launcher
(``python -m sglang.launch_server ... --kv-policy streaming-sink``): our plugin is
loaded by SGLang's entry point in the server, scheduler and detokenizer processes."""

from __future__ import annotations

import json
import os
import time

import pytest
import requests

from conftest import CONTEXT
from oracle import OracleLlama
from server_process import REQUEST_TIMEOUT_S, free_port, running_server
from sglang_helpers import TOL, S, Trace, W, launch_server_cmd, random_ids, trace_path


@pytest.fixture(scope="module")
def server(tiny_llama_128, tmp_path_factory):
    trace = Trace(trace_path(tmp_path_factory))
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = launch_server_cmd(tiny_llama_128, port)
    with running_server(cmd, port, log, dict(os.environ), timeout=600) as base:
        yield base, trace, log


def _used_tokens(base: str) -> int:
    loads = requests.get(base + "/v1/loads", timeout=REQUEST_TIMEOUT_S).json()["loads"]
    return sum(int(load["num_used_tokens"]) for load in loads)


def _wait_idle(base: str, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while (used := _used_tokens(base)) and time.time() < deadline:
        time.sleep(0.5)
    return used


def test_streamed_completion_four_times_past_the_context(server):
    base, trace, log = server
    trace.clear()
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 4 * CONTEXT,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage = 0, None
    with requests.post(base + "/v1/completions", json=body, stream=True, timeout=600) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            chunks += bool(data.get("choices"))
            usage = data.get("usage") or usage
    assert usage["completion_tokens"] == 4 * CONTEXT
    # Streamed, not one blob; a busy server merges several tokens into one event, so there
    # may be far fewer events than tokens.
    assert chunks > 8, chunks
    held = [v for r in trace.records() for v in r["step"].values()]
    assert max(held) == S + W  # before each step's allocation: sinks + window, nothing older
    assert _wait_idle(base) == 0
    assert "streaming-sink: 4 sink tokens" in log.read_text()


def test_prompt_logprobs_match_oracle(server, tiny_llama_128):
    base, _, _ = server
    ids = random_ids(8 * CONTEXT, seed=2)
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0}
    out = requests.post(base + "/generate", json=body, timeout=600).json()
    lp = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in lp] == ids
    import torch

    got = torch.tensor([x for x, _, _ in lp[1:]], dtype=torch.float64)
    want = OracleLlama(tiny_llama_128, sink_tokens=S, window_tokens=W, block_size=1).token_logprobs(ids)
    diff = (got - want).abs().max().item()
    print(f"server prompt logprobs, {len(ids)} tokens: max |engine - oracle| = {diff:.3g}")
    assert diff < TOL


def test_abort_mid_stream_returns_every_slot(server):
    base, trace, _ = server
    trace.clear()
    rid = "abort-me"
    body = {"input_ids": random_ids(300, seed=7), "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 16 * CONTEXT, "temperature": 0, "ignore_eos": True}}
    last = None
    with requests.post(base + "/generate", json=body, stream=True, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            last = json.loads(line[6:])
            if last["meta_info"]["completion_tokens"] >= 2 * CONTEXT and _used_tokens(base) > 0:
                requests.post(base + "/abort_request", json={"rid": rid}, timeout=REQUEST_TIMEOUT_S)
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert 2 * CONTEXT <= last["meta_info"]["completion_tokens"] < 16 * CONTEXT
    held = [v for r in trace.records() for v in r["step"].values()]
    assert max(held) == S + W
    assert _wait_idle(base) == 0
