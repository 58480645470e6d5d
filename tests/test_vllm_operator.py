"""What an operator meets running `vllm serve --kv-policy streaming-sink` (issue 22): the
defaults the policy changes (help, the default max_tokens), refusals in one line, the
startup advice for a KV cache too small, and the policy's metrics with several API servers
(prometheus_client's multiprocess mode).

Real `vllm serve` processes over loopback (tests/server_process.py), on the tiny random
Llama (context 256): one server with `--api-server-count 2` for the request defaults and
the metrics; short-lived `vllm serve` runs that must fail at startup for the rest.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from server_process import (REQUEST_TIMEOUT_S, free_port, running_server, served_model, streamed_past,
                            vllm_server_env)

CONTEXT = 256  # the tiny model's max_position_embeddings
VLLM = str(Path(sys.executable).with_name("vllm"))
CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}")
POLICY = ["--kv-policy", "streaming-sink", "--sink-tokens", "4", "--sink-window", "128",
          "--block-size", "32", "--dtype", "float32", "--max-num-batched-tokens", "256"]


def _vllm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([VLLM, *args], capture_output=True, text=True, env=vllm_server_env(), timeout=timeout)


# ---- defaults --------------------------------------------------------------------------

def test_help_shows_every_default_the_policy_changes():
    run = _vllm("serve", "--help=streaming-sink", timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    flat = " ".join(run.stdout.split())  # argparse wraps the text
    for said in ("--max-model-len 131072", "a request without max_tokens still gets at most the "
                 "model's context of new tokens", "--override-generation-config "
                 "'{\"max_new_tokens\": N}'", "chunked prefill on", "--attention-backend CUSTOM"):
        assert said in flat, said


def test_default_max_tokens_in_the_engine_config(tiny_llama):
    """The default the OpenAI server reads (ModelConfig.get_diff_sampling_param): the model's
    context under the policy; the user's --override-generation-config max_new_tokens wins;
    LLM(...) and stock vLLM keep theirs (no max_tokens: 16 offline, max_model_len - prompt
    in the server)."""
    import vllm_sink  # noqa: F401  (the LLM / EngineArgs keywords, before vLLM binds them)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    def defaults(usage=UsageContext.OPENAI_API_SERVER, **kw):
        args = EngineArgs(model=tiny_llama, block_size=32, dtype="float32", **kw)
        config = args.create_engine_config(usage_context=usage)
        return config.model_config.max_model_len, config.model_config.get_diff_sampling_param()

    assert defaults(kv_policy="streaming-sink") == (131072, {"max_tokens": CONTEXT})
    assert defaults(kv_policy="streaming-sink", override_generation_config={"max_new_tokens": 50000}) == (
        131072, {"max_tokens": 50000})
    assert defaults(UsageContext.LLM_CLASS, kv_policy="streaming-sink") == (131072, {})
    assert defaults() == (CONTEXT, {})


@pytest.fixture(scope="module")
def two_api_servers(tiny_llama, tmp_path_factory):
    """The policy behind two API server processes (prometheus multiprocess mode), with
    vLLM's default max_model_len under the policy (131072) and no max_tokens default set."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [VLLM, "serve", tiny_llama, "--host", "127.0.0.1", "--port", str(port), *POLICY,
           "--api-server-count", "2", "--max-num-seqs", "8", "--chat-template", CHAT_TEMPLATE,
           "--shutdown-timeout", "10"]
    with running_server(cmd, port, log, vllm_server_env(), timeout=600) as base:
        yield base, log


def test_a_request_without_max_tokens_stops_at_the_context(two_api_servers):
    base, log = two_api_servers
    model = served_model(base)
    chat = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "temperature": 0, "ignore_eos": True}
    for _ in range(2):  # two API server processes share the port: both have the default
        reply = requests.post(base + "/v1/chat/completions", json=chat, timeout=600).json()
        assert reply["choices"][0]["finish_reason"] == "length", reply
        assert reply["usage"]["completion_tokens"] == CONTEXT, reply["usage"]
    # An endless stream is asked for per request, and is not capped by the default.
    reply = requests.post(base + "/v1/chat/completions", json={**chat, "max_tokens": 3 * CONTEXT},
                          timeout=600).json()
    assert reply["usage"]["completion_tokens"] == 3 * CONTEXT, reply["usage"]
    text = log.read_text()
    assert f"a request without max_tokens gets at most {CONTEXT} new tokens" in text
    assert "max_model_len 131072" in text


# ---- metrics with several API servers --------------------------------------------------

def _scrape(base: str) -> dict[str, float]:
    """The vllm:streaming_sink_* samples, by name (+ le for buckets); one engine."""
    samples: dict[str, float] = {}
    for line in requests.get(base + "/metrics", timeout=REQUEST_TIMEOUT_S).text.splitlines():
        if line.startswith("vllm:streaming_sink_"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0]
            if 'le="' in name:
                key += "{le=" + name.split('le="')[1].split('"')[0] + "}"
            assert key not in samples, f"{key} twice: one series per engine, merged over processes"
            samples[key] = float(value)
    return samples


def test_policy_metrics_with_two_api_servers(two_api_servers):
    """With two API servers the series are on /metrics (either process answers, both
    serve the merged files), with the values the policy implies: a stream past the
    window holds its sinks and Sb + Wb .. Sb + Wb + 1 blocks; run to its end it grows the
    recycled counter by exactly the blocks the window left behind (summed over the
    processes that received the steps' stats) and the histogram by its peak."""
    from streaming_sink.metric_names import exposed_names
    from streaming_sink.policy import SinkPolicy

    base, log = two_api_servers
    policy = SinkPolicy(4, 128, 32)
    model, P = served_model(base), 9
    before = _scrape(base)
    assert {k.split("{")[0] for k in before} == exposed_names("vllm"), sorted(before)
    assert before["vllm:streaming_sink_max_live_blocks"] == policy.max_live_blocks() == 6

    # the server's default --max-model-len (131072): minutes of tokens, far past the scrapes
    body = {"model": model, "prompt": list(range(5, 5 + P)), "max_tokens": 130000,
            "temperature": 0, "ignore_eos": True}
    past = policy.dense_tokens + 4 * policy.block_size - P + 1  # four blocks past the window
    with streamed_past(base + "/v1/completions", body, past):
        during = [_scrape(base) for _ in range(3)]
    for s in during:
        assert s["vllm:streaming_sink_requests_past_window"] == 1, s
        assert s["vllm:streaming_sink_sink_blocks_pinned"] == policy.sink_blocks
        assert policy.sink_blocks + policy.window_blocks <= s["vllm:streaming_sink_live_blocks"] <= 6
    assert during[-1]["vllm:streaming_sink_recycled_blocks_total"] > before[
        "vllm:streaming_sink_recycled_blocks_total"]

    h = "vllm:streaming_sink_request_live_blocks_"
    idle = _wait_idle(base, peaks=before[h + "count"] + 1)  # the aborted stream's peak
    G = 3 * CONTEXT
    reply = requests.post(base + "/v1/completions", json={**body, "max_tokens": G, "stream": False},
                          timeout=600).json()
    assert reply["usage"]["completion_tokens"] == G, reply
    after = _wait_idle(base, peaks=idle[h + "count"] + 1)
    expected = len(policy.freeable_prefix_blocks(P + G - 2))  # the last sampled token is never fed
    assert expected > 10
    c = "vllm:streaming_sink_recycled_blocks_total"
    assert after[c] - idle[c] == expected
    assert after[h + "count"] - idle[h + "count"] == 1
    assert after[h + "sum"] - idle[h + "sum"] == policy.max_live_blocks(1)
    assert "are not exported" not in log.read_text()


def _wait_idle(base: str, peaks: float, timeout: float = 120) -> dict:
    """The scrape once every block is back and ``peaks`` requests have reported their
    peak. Each step's stats reach one of the two API servers, and the frontends merge
    the files on every scrape, so both are waited for, then read once more: a
    request reported twice shows as a count past ``peaks``."""
    gauges = ("requests_past_window", "sink_blocks_pinned", "live_blocks")
    count = "vllm:streaming_sink_request_live_blocks_count"
    deadline = time.time() + timeout
    while True:
        got = _scrape(base)
        done = all(got["vllm:streaming_sink_" + k] == 0 for k in gauges) and got[count] >= peaks
        if done or time.time() > deadline:
            time.sleep(1.0)
            got = _scrape(base)
            for k in gauges:
                assert got["vllm:streaming_sink_" + k] == 0, k  # every block back
            assert got[count] == peaks, (got[count], peaks)
            return got
        time.sleep(0.5)


# ---- startup: refusals in one line, advice for a small KV cache ------------------------

def test_policy_refusals_are_one_line(tiny_llama):
    """A setting the policy refuses while vLLM builds its config: one line naming the flag,
    exit 2, no traceback. Other errors keep vLLM's traceback (a model path that is not one)."""
    port = str(free_port())
    runs = {
        "window": [VLLM, "serve", tiny_llama, "--kv-policy", "streaming-sink", "--block-size", "32",
                   "--sink-window", "7", "--port", port],
        "backend": [VLLM, "serve", tiny_llama, "--kv-policy", "streaming-sink",
                    "--attention-backend", "FLEX_ATTENTION", "--port", port],
        "not_ours": [VLLM, "serve", str(Path(tiny_llama) / "missing"), "--kv-policy", "streaming-sink",
                     "--port", port],
    }
    procs = {k: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=vllm_server_env()) for k, cmd in runs.items()}
    out = {k: p.communicate(timeout=300) for k, p in procs.items()}
    for case, flag in (("window", "--sink-window must be a positive multiple of the KV block size (32)"),
                       ("backend", "--attention-backend")):
        stdout, stderr = out[case]
        assert procs[case].returncode == 2, (case, stderr[-3000:])
        assert "Traceback" not in stdout + stderr, (case, stderr[-3000:])
        errors = [line for line in stderr.splitlines() if line.startswith("vllm serve: error:")]
        assert len(errors) == 1 and flag in errors[0], (case, stderr[-3000:])
    stdout, stderr = out["not_ours"]
    assert procs["not_ours"].returncode not in (0, 2)
    assert "Traceback" in stdout + stderr and "vllm serve: error:" not in stderr


def test_a_small_kv_cache_gets_the_policys_advice(tiny_llama):
    """Too few KV blocks for one request: the policy's own message (a fixed Sb + Wb + 1
    blocks plus a prefill chunk, whatever the length; what to change), not vLLM's advice
    to decrease max_model_len."""
    run = _vllm("serve", tiny_llama, *POLICY, "--num-gpu-blocks-override", "8",
                "--port", str(free_port()), timeout=400)
    text = run.stdout + run.stderr
    assert run.returncode != 0
    flat = " ".join(text.split())
    assert ("holds Sb + Wb + 1 = 1 sink + 4 window + 1 current = 6 blocks, plus 8 for the 256 "
            "tokens a step may prefill (--max-num-batched-tokens 256): 14 blocks of 32 tokens") in flat, text[-4000:]
    assert "VLLM_CPU_KVCACHE_SPACE" in flat and "--num-gpu-blocks-override (now 8)" in flat
    assert "a shorter --sink-window (now 128 tokens)" in flat
    assert "decreasing `max_model_len`" not in flat

