"""Drive the real ``sglang.Engine`` (CPU) and read what the plugin traced from its allocator.

The Engine runs its scheduler in a spawned process; the plugin writes one JSON
line per scheduler step to ``$SGLANG_SINK_TRACE``: the slots each running request
holds and the slots in use in SGLang's allocator (sglang_sink/trace.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from oracle import check_greedy

S, W, CHUNK = 4, 64, 100  # dense regime: tokens [0, 69); chunks of 100 cross the switch
TOL = 2e-4  # float32 engine vs float64 oracle, logprobs (as for vLLM)


def engine_args(model: str, policy: bool = True, **kwargs) -> dict:
    args = dict(model_path=model, device="cpu", dtype="float32", random_seed=0, log_level="error",
                max_total_tokens=2048, chunked_prefill_size=CHUNK, max_running_requests=8)
    if policy:  # the stream may be far longer than the model's context
        args.update(kv_policy="streaming-sink", sink_tokens=S, sink_window=W, context_length=16384)
    args.update(kwargs)
    return args


def launch_server_cmd(model: str, port: int, *extra: str, sink_tokens: int | str = S, sink_window: int = W) -> list[str]:
    """``python -m sglang.launch_server`` on 127.0.0.1 with engine_args' settings (CPU, fp32,
    the policy, 2048 slots, CHUNK-token prefill chunks, a 16384-token context, 8 requests),
    then ``extra`` flags."""
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model,
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
            "--kv-policy", "streaming-sink", "--sink-tokens", str(sink_tokens), "--sink-window", str(sink_window),
            "--max-total-tokens", "2048", "--chunked-prefill-size", str(CHUNK), "--context-length", "16384",
            "--max-running-requests", "8", "--skip-server-warmup", *extra]


def random_ids(n: int, seed: int, vocab: int = 383) -> list[int]:
    """Ids in [3, vocab). SGLang reports prompt ids >= vocab_size - 1 as 0 in its
    prompt logprobs (a clip meant for image-hash tokens), so the last id is left out."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def prompt_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, teacher-forced through the engine."""
    out = engine.generate(input_ids=[ids], sampling_params={"max_new_tokens": 1, "temperature": 0},
                          return_logprob=True, logprob_start_len=0)
    lp = out[0]["meta_info"]["input_token_logprobs"]
    got = [t for _, t, _ in lp]
    assert got == ids, f"{len(got)} prompt logprobs for {len(ids)} prompt tokens, or other ids"
    return torch.tensor([x for x, _, _ in lp[1:]], dtype=torch.float64)


def decoded(outs: list[dict]) -> list[tuple[list[int], torch.Tensor, int]]:
    """``engine.generate(..., return_logprob=True)`` outputs as (tokens, their logprobs,
    cached prompt tokens) per request."""
    res = []
    for out in outs:
        lp = out["meta_info"]["output_token_logprobs"]
        res.append(([t for _, t, _ in lp], torch.tensor([x for x, _, _ in lp], dtype=torch.float64),
                    out["meta_info"]["cached_tokens"]))
    return res


def greedy(engine, prompts: list[list[int]], n: int) -> list[tuple[list[int], torch.Tensor]]:
    """Concurrent greedy decodes: (tokens, their logprobs) per prompt."""
    outs = engine.generate(input_ids=prompts, sampling_params={
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}, return_logprob=True)
    return [(tokens, lps) for tokens, lps, _ in decoded(outs)]


def check_oracle(oracle, prompt: list[int], gen: list[int], got: torch.Tensor, what: str) -> float:
    """A greedy continuation of ``prompt`` against the oracle (oracle.check_greedy, TOL);
    returns the largest logprob difference."""
    return check_greedy(oracle.logprobs(prompt + gen), len(prompt), gen, got, TOL, what)


class Trace:
    """The plugin's per-step records, from a fresh file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def clear(self) -> None:
        self.path.write_text("")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def trace_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "steps.jsonl"
    path.write_text("")
    os.environ["SGLANG_SINK_TRACE"] = str(path)  # read by the scheduler at every step
    return path


def flush(engine, tries: int = 100) -> None:
    """SGLang flushes the radix tree (and its pools) only when fully idle: retry until then."""
    import time

    for _ in range(tries):
        out = engine.flush_cache()
        if getattr(out, "success", out):
            return
        time.sleep(0.1)
    raise AssertionError("the engine never went idle for flush_cache")
