"""SIGTERM under load: how a real `vllm serve` ends N open streams, --kv-policy streaming-sink vs stock.

Each run starts `vllm serve` (multi-process, as users run it) on 127.0.0.1, opens N long
streaming completions (`max_tokens` large, `ignore_eos`), waits until every stream has
produced tokens, then sends SIGTERM to the `vllm serve` process only (what an operator's
`kill` or Kubernetes does). It records, per stream, how it ended and when:

    finish    a choice with a finish_reason (e.g. "abort")
    error     an `{"error": ...}` event
    closed    the server closed the connection without either
    hung      nothing ended it within --client-timeout s of SIGTERM (the client gives up)

plus the time from SIGTERM to the `vllm serve` process's exit and to the exit of its whole
process group (engine core, workers). Runs alternate stock, policy, stock, policy, ...
(--repeats of each). Prints a table (medians and max over runs) and writes JSON.

    .venv/bin/python benchmarks/sigterm_shutdown.py                         # 64 streams, 3 repeats
    .venv/bin/python benchmarks/sigterm_shutdown.py --streams 32 --repeats 5 --json out.json
    .venv/bin/python benchmarks/sigterm_shutdown.py --server-arg=--shutdown-timeout=10   # vLLM's drain mode
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
VLLM = str(Path(sys.executable).with_name("vllm"))
OFFLINE_ENV = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1")
POLICY_FLAGS = ["--kv-policy", "streaming-sink", "--sink-tokens", "4", "--sink-window", "128"]


@dataclass
class Stream:
    index: int
    text_events: int = 0
    first_token_at: float | None = None
    kind: str = "hung"              # finish | error | closed | hung | http_error
    detail: str = ""                # finish_reason, error message or exception
    ended_at: float | None = None   # absolute monotonic time of the terminal event / close
    done_marker: bool = False       # "data: [DONE]" seen
    events_after_sigterm: int = 0
    end_s: float | None = None      # seconds from SIGTERM to the end (None: hung)


@dataclass
class Run:
    system: str
    repeat: int
    streams: list[Stream] = field(default_factory=list)
    ready_s: float = 0.0            # server start -> /health 200
    streaming_s: float = 0.0        # first request -> every stream has tokens
    server_exit_s: float | None = None   # SIGTERM -> `vllm serve` exited (None: still up at the limit)
    group_exit_s: float | None = None    # SIGTERM -> no live process left in its process group
    server_rc: int | None = None
    killed: bool = False            # we had to SIGKILL the group at the end
    clients_gave_up_s: float | None = None   # SIGTERM -> the client closed its hung streams (None: none hung)
    log_tail: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_in_group(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "(comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict, st: Stream, clock: dict) -> None:
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                st.kind, st.detail, st.ended_at = "http_error", f"{r.status} {(await r.text())[:200]}", time.monotonic()
                return
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if clock.get("sigterm") is not None:
                    st.events_after_sigterm += 1
                data = line[6:]
                if data == b"[DONE]":
                    st.done_marker = True
                    continue
                event = json.loads(data)
                if "error" in event and st.kind == "hung":
                    err = event["error"]
                    st.kind, st.ended_at = "error", time.monotonic()
                    st.detail = (err.get("message") if isinstance(err, dict) else str(err))[:200]
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        st.text_events += 1
                        if st.first_token_at is None:
                            st.first_token_at = time.monotonic()
                    if choice.get("finish_reason") and st.kind == "hung":
                        st.kind, st.detail, st.ended_at = "finish", choice["finish_reason"], time.monotonic()
        if st.kind == "hung":  # EOF without a terminal event
            detail = "eof after [DONE]" if st.done_marker else "eof"
            st.kind, st.detail, st.ended_at = "closed", detail, time.monotonic()
    except (aiohttp.ClientError, ConnectionError, asyncio.IncompleteReadError) as e:
        if st.kind == "hung":
            st.kind, st.detail, st.ended_at = "closed", f"{type(e).__name__}: {e}"[:200], time.monotonic()


async def drive(args, base: str, model: str, proc: subprocess.Popen, run: Run, log: Path) -> None:
    clock: dict = {"sigterm": None}
    rng = random.Random(1234 + run.repeat)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        run.streams = [Stream(i) for i in range(args.streams)]
        tasks = []
        t0 = time.monotonic()
        for st in run.streams:
            body = {"model": model, "prompt": [1] + [rng.randrange(3, 300) for _ in range(args.prompt_tokens - 1)],
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
            tasks.append(asyncio.create_task(one_stream(session, base + "/v1/completions", body, st, clock)))
        # Wait until every stream is producing tokens (or something ended early).
        while True:
            n = sum(st.first_token_at is not None for st in run.streams)
            ended = [st for st in run.streams if st.kind != "hung"]
            print(f"\r  [{run.system} #{run.repeat}] streaming {n}/{args.streams}"
                  f" ({time.monotonic() - t0:.0f} s)", end="", file=sys.stderr, flush=True)
            if n == args.streams or ended:
                break
            if time.monotonic() - t0 > args.startup_timeout:
                raise RuntimeError(f"only {n}/{args.streams} streams started in {args.startup_timeout} s")
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode} before SIGTERM:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        if ended:
            raise RuntimeError(f"{len(ended)} stream(s) ended before SIGTERM: {ended[0]} (raise --max-tokens?)")
        run.streaming_s = time.monotonic() - t0
        await asyncio.sleep(args.settle)
        print(f"\r  [{run.system} #{run.repeat}] {args.streams} streams open; SIGTERM to vllm serve (pid {proc.pid})",
              file=sys.stderr, flush=True)
        t_term = time.monotonic()
        clock["sigterm"] = t_term
        os.kill(proc.pid, signal.SIGTERM)

        deadline = t_term + args.client_timeout
        pending = set(tasks)
        while pending and time.monotonic() < deadline:
            _, pending = await asyncio.wait(pending, timeout=0.2)
            if run.server_exit_s is None and proc.poll() is not None:
                run.server_exit_s, run.server_rc = time.monotonic() - t_term, proc.returncode
            ended = sum(st.kind != "hung" for st in run.streams)
            print(f"\r  [{run.system} #{run.repeat}] {time.monotonic() - t_term:5.1f} s after SIGTERM: "
                  f"{ended}/{args.streams} streams ended, server "
                  f"{'exited' if run.server_exit_s is not None else 'up'}", end="", file=sys.stderr, flush=True)
        for task in pending:  # the client gives up: these streams hung
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pending:
            run.clients_gave_up_s = time.monotonic() - t_term
        for st in run.streams:
            if st.kind != "hung" and st.ended_at is not None:
                st.end_s = st.ended_at - t_term
        print(file=sys.stderr)
    # Server and process-group exit (the clients are gone now).
    pgid = proc.pid
    limit = t_term + args.client_timeout + args.exit_timeout
    while time.monotonic() < limit:
        if run.server_exit_s is None and proc.poll() is not None:
            run.server_exit_s, run.server_rc = time.monotonic() - t_term, proc.returncode
        if run.server_exit_s is not None and not live_in_group(pgid):
            run.group_exit_s = time.monotonic() - t_term
            break
        await asyncio.sleep(0.1)


def one_run(args, system: str, repeat: int, model: str, logdir: Path) -> Run:
    run = Run(system, repeat)
    port = free_port()
    log = logdir / f"{system}-{repeat}.log"
    cmd = [VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--block-size", "32",
           "--max-model-len", str(args.max_model_len), "--dtype", "float32",
           "--max-num-seqs", str(max(args.streams, 1)), "--disable-uvicorn-access-log"]
    cmd += POLICY_FLAGS if system == "policy" else []
    cmd += args.server_arg
    env = {**os.environ, **{k: v for k, v in OFFLINE_ENV.items() if k not in os.environ}}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # multi-process, as users run it
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        import requests
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() - t0 > args.startup_timeout:
                raise RuntimeError(f"server not healthy in {args.startup_timeout} s:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            print(f"\r  [{system} #{repeat}] starting server ({time.monotonic() - t0:.0f} s)", end="",
                  file=sys.stderr, flush=True)
            time.sleep(1)
        run.ready_s = time.monotonic() - t0
        model_id = requests.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(drive(args, base, model_id, proc, run, log))
    finally:
        if live_in_group(proc.pid) or proc.poll() is None:
            run.killed = proc.poll() is None or bool(live_in_group(proc.pid))
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        lines = [ln for ln in log.read_text(errors="replace").splitlines()
                 if "shutdown" in ln.lower() or "Error" in ln or "Traceback" in ln]
        run.log_tail = "\n".join(lines[-25:])
    return run


def summarize(runs: list[Run], system: str) -> dict:
    rs = [r for r in runs if r.system == system]
    if not rs:
        return {}
    ends = [s.end_s for r in rs for s in r.streams if s.end_s is not None]
    kinds: dict[str, int] = {}
    for r in rs:
        for s in r.streams:
            key = s.kind if s.kind != "finish" else f"finish:{s.detail}"
            kinds[key] = kinds.get(key, 0) + 1

    def med(xs):
        return statistics.median(xs) if xs else None

    exits = [r.server_exit_s for r in rs]
    return dict(
        runs=len(rs),
        runs_with_hung_streams=sum(any(s.kind == "hung" for s in r.streams) for r in rs),
        stream_ends=kinds,
        end_s_median=med(ends), end_s_max=max(ends) if ends else None,
        server_exit_s=exits, group_exit_s=[r.group_exit_s for r in rs],
        server_exit_s_median=med([e for e in exits if e is not None]),
        runs_killed=sum(r.killed for r in rs),
    )


def fmt(x, unit="s") -> str:
    return "-" if x is None else f"{x:.1f} {unit}".strip()


def print_table(args, runs: list[Run]) -> None:
    print()
    print(f"SIGTERM to `vllm serve` with {args.streams} open streams (client gives up {args.client_timeout:.0f} s "
          f"after SIGTERM){' server args: ' + ' '.join(args.server_arg) if args.server_arg else ''}")
    hdr = f"{'system':7} {'run':>3} | {'finish':>6} {'error':>5} {'closed':>6} {'hung':>4} | " \
          f"{'end med':>8} {'end max':>8} | {'serve exit':>10} {'group exit':>10} | detail"
    print(hdr)
    print("-" * len(hdr))
    for r in runs:
        c = {k: sum(s.kind == k for s in r.streams) for k in ("finish", "error", "closed", "hung")}
        ends = [s.end_s for s in r.streams if s.end_s is not None]
        details = sorted({s.detail for s in r.streams if s.kind != "hung"})
        print(f"{r.system:7} {r.repeat:>3} | {c['finish']:>6} {c['error']:>5} {c['closed']:>6} {c['hung']:>4} | "
              f"{fmt(statistics.median(ends) if ends else None):>8} {fmt(max(ends) if ends else None):>8} | "
              f"{fmt(r.server_exit_s):>10} {fmt(r.group_exit_s):>10} | {'; '.join(details)[:80]}"
              f"{' (killed)' if r.killed else ''}")
    print()
    for system in ("stock", "policy"):
        s = summarize(runs, system)
        if s:
            print(f"{system:7}: {s['runs_with_hung_streams']}/{s['runs']} runs with hung streams; stream ends "
                  f"{s['stream_ends']}; SIGTERM->end median {fmt(s['end_s_median'])}, max {fmt(s['end_s_max'])}; "
                  f"SIGTERM->serve exit median {fmt(s['server_exit_s_median'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: the tiny random Llama of tests/tiny_models.py, "
                                    "16384-token context so stock can stream long too)")
    ap.add_argument("--streams", type=int, default=64, help="open streaming completions per run (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each system, interleaved (default 3)")
    ap.add_argument("--systems", default="stock,policy", help="comma list, run in this order each repeat")
    ap.add_argument("--max-tokens", type=int, default=12000, help="per stream (default 12000)")
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of streaming before SIGTERM (default 2)")
    ap.add_argument("--client-timeout", type=float, default=90.0,
                    help="seconds after SIGTERM before a client gives up on a stream ('hung'; default 90)")
    ap.add_argument("--exit-timeout", type=float, default=60.0,
                    help="further seconds to wait for the server to exit before SIGKILL (default 60)")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `vllm serve` argument, repeatable (e.g. --server-arg=--shutdown-timeout=10)")
    ap.add_argument("--json", default="sigterm_shutdown.json", help="output file (default sigterm_shutdown.json)")
    ap.add_argument("--log-dir", help="server logs (default: a temporary folder)")
    args = ap.parse_args()

    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_llama
        model = os.path.join(tempfile.gettempdir(), "streaming-sink-tiny16k")
        if not (Path(model) / "model.safetensors").exists():
            build_tiny_llama(model, max_position_embeddings=args.max_model_len)
    logdir = Path(args.log_dir or tempfile.mkdtemp(prefix="sigterm-logs-"))
    logdir.mkdir(parents=True, exist_ok=True)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    runs: list[Run] = []
    t_start = time.monotonic()
    for rep in range(args.repeats):
        for system in systems:
            print(f"run {len(runs) + 1}/{args.repeats * len(systems)}: {system} #{rep} "
                  f"({time.monotonic() - t_start:.0f} s elapsed; logs in {logdir})", file=sys.stderr, flush=True)
            run = one_run(args, system, rep, model, logdir)
            runs.append(run)
            c = {k: sum(s.kind == k for s in run.streams) for k in ("finish", "error", "closed", "hung")}
            print(f"  -> {c}; serve exit {fmt(run.server_exit_s)}, group exit {fmt(run.group_exit_s)}",
                  file=sys.stderr, flush=True)
            Path(args.json).write_text(json.dumps(dict(
                args=vars(args), model=model, policy_flags=POLICY_FLAGS,
                runs=[asdict(r) for r in runs],
                summary={s: summarize(runs, s) for s in systems}), indent=1))
    print_table(args, runs)
    print(f"\nJSON: {args.json}; server logs: {logdir}")


if __name__ == "__main__":
    main()
