"""Start a real HTTP server (vLLM's or SGLang's stock launcher) on 127.0.0.1 for a test.

Engine-free, so both test venvs use it. The server runs in its own process group,
so cleanup reaches the engine's child processes (vLLM's engine core and worker,
SGLang's scheduler and detokenizer) too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

# One quick HTTP call to a test server (/metrics, /v1/models, an abort): a loaded CI box
# serves even these in seconds (a /metrics scrape once took ~5 s), so allow far more.
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(cmd: list[str], port: int, log: Path, env: dict, timeout: float = 300):
    """Run ``cmd`` (which must serve on ``port``) until ``/health`` answers 200; yields the
    base URL. A server that exits or stays unhealthy fails the test with its log's tail."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy starting
                pass
            time.sleep(1)
        else:
            pytest.fail(f"server not healthy in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def vllm_server_env() -> dict:
    """The environment a ``vllm serve`` subprocess of a test runs in: this session's, with
    vLLM's multi-process engine path (conftest may turn it off for in-process engines) and
    no inherited Prometheus multiprocess folder (vLLM makes its own for several API servers)."""
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def served_model(base: str) -> str:
    """The model name an OpenAI-compatible server at ``base`` serves."""
    return requests.get(base + "/v1/models", timeout=REQUEST_TIMEOUT_S).json()["data"][0]["id"]


@contextlib.contextmanager
def streamed_past(url: str, body: dict, tokens: int):
    """POST ``body`` to an OpenAI-compatible ``url`` as a stream and read it until the server
    has generated ``tokens`` completion tokens; the with-block runs while the request still
    streams, and leaving it closes the connection (the server aborts the request). Yields the
    tokens counted so far. Counted from vLLM's per-event usage (``continuous_usage_stats``),
    never from events: a busy server merges many tokens into one event (CI once saw a
    16000-token stream end before its 260th event)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with requests.post(url, json=body, stream=True, timeout=600) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                got = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", 0)
                if got >= tokens:
                    yield got
                    return
    pytest.fail(f"the stream ended before {tokens} generated tokens")
