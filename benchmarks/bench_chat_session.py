"""Multi-turn chat past the context: prefix caching on vs off under `--kv-policy streaming-sink`.

Two real `vllm serve` servers in one run, both ``--kv-policy streaming-sink --sink-tokens 4
--sink-window 1024`` on the embedded SmolLM2-135M-Instruct (8192-token context), one with vLLM's
prefix caching (its default, kept under the policy) and one with ``--no-enable-prefix-caching``.
One chat session drives both: ``--turns`` turns (default 40) of ~``--user-tokens`` user messages
(default 300 tokens: consecutive passages of Austen's *Emma* with a question) and replies of exactly
``--reply-tokens`` (default 100: temperature 0, ``ignore_eos``), through the chat completions API
with the model's chat template, so the last prompt is ~16.1k tokens, ~2x the context. Every turn
sends the same prompt (the history so far + the new message) to both servers, one after the other,
alternating which goes first; the history takes the caching server's replies. Only one server
computes at a time.

Per turn and server: the time to the first streamed token (TTFT), the prompt tokens and the cached
ones (``usage.prompt_tokens_details.cached_tokens``, ``--enable-prompt-tokens-details``), and the CPU
seconds the server's process tree (API server + engine core, psutil) spent until the first token
and in all: CPU time holds still on this shared, noisy machine where wall time does not. Each
figure is the median over ``--repeats`` sessions (each a different stretch of the book, so no
session hits another's cache). Prints a table (turn, prompt tokens, TTFT on / off, hit share,
ratios) and writes a plot (TTFT vs turn, both servers) and every raw figure as JSON, by default
docs/chat-sessions.png and docs/chat-sessions.json.

Threads: each server runs with ``OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set
(the stable setting on the loaded 2-core machines, docs/speed.md); as the requests are sequential,
only one engine computes at a time and the other core takes the API server, the client and the
machine's other load. ``--pin`` binds server A to core 0 and B to core 1 instead (``taskset``).

    .venv/bin/python benchmarks/bench_chat_session.py --repeats 2          # docs/chat-sessions.md: 33 min
    .venv/bin/python benchmarks/bench_chat_session.py --turns 4 --out /tmp/chat   # a quick check
    .venv/bin/python benchmarks/bench_chat_session.py --repeats 3 --json out.json

Server startup: ~1-3 min (both start at once; a first start with new flags adds torch.compile).
The caching-off side dominates the run: turn k re-prefills the whole history (~15 min a session on
the loaded 2-core machine; the first 4 turns, ``--turns 4``, take ~1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from chat_session import (DEFAULT_SYSTEM, SERVER_ENV, Tokens, chat_turn, model_context,  # noqa: E402
                          random_messages, start_server, user_messages)
from stream_past_context import Terminal, kv_pool, stop, wait_healthy  # noqa: E402

THREAD_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


class TreeCPU:
    """CPU seconds (user + system) of a server's process tree: the API server and its children
    (vLLM's engine core and whatever it starts), re-listed on every read."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.gone = 0.0  # CPU of children that exited, as last read
        self.last: dict[int, float] = {}

    def __call__(self) -> float:
        now: dict[int, float] = {}
        for p in [self.root] + self.root.children(recursive=True):
            try:
                t = p.cpu_times()
                now[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        self.gone += sum(v for pid, v in self.last.items() if pid not in now)
        self.last = now
        return self.gone + sum(now.values())


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder with a chat template (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--turns", type=int, default=40, help="turns a session (default 40: ~2x the context)")
    ap.add_argument("--user-tokens", type=int, default=300, help="tokens of each user message (default 300)")
    ap.add_argument("--reply-tokens", type=int, default=100, help="tokens of each reply, exactly (default 100)")
    ap.add_argument("--text", choices=["austen", "random"], default="austen",
                    help="user messages: Austen passages (default) or seeded random words")
    ap.add_argument("--book", default="emma")
    ap.add_argument("--sink-tokens", type=int, default=4, help="both servers (default 4)")
    ap.add_argument("--sink-window", type=int, default=1024, help="both servers (default 1024)")
    ap.add_argument("--repeats", type=int, default=1, help="sessions, each a different stretch of the book "
                                                           "(default 1; medians per turn over them)")
    ap.add_argument("--pin", action="store_true", help="taskset server A (caching on) to core 0, B to core 1")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for chat-sessions.png/.json (default docs/)")
    ap.add_argument("--json", help="write the raw figures here instead of OUT/chat-sessions.json")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--replot", metavar="JSON", help="only redraw OUT/chat-sessions.png from this run's JSON")
    args, serve_args = ap.parse_known_args()  # the rest goes to both `vllm serve`
    if args.replot:
        doc = json.loads(Path(args.replot).read_text())
        plot(doc["table"], Path(args.out) / "chat-sessions.png", doc["settings"], doc["settings"]["context"])
        return
    # what chat_session.start_server / chat_turn read
    args.enforce_eager, args.temperature, args.ignore_eos = False, 0.0, True
    args.max_model_len = 65536

    from streaming_sink_tools import prepare

    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    model = args.model or prepare.default_model_path()
    if args.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    else:
        tok = prepare.load_tokenizer()
    ctx = model_context(model)
    tokens = Tokens(tok)
    n_need = args.turns * args.repeats
    if args.text == "austen":
        texts = user_messages(prepare.corpus_text(args.book), tokens, args.user_tokens, n_need)
    else:
        texts = random_messages(tokens, args.user_tokens, n_need, seed=0)
    sessions = [texts[r * args.turns:(r + 1) * args.turns] for r in range(args.repeats)]

    import vllm  # noqa: F401  (its version, for the record)

    settings = dict(
        command="$ " + shlex.join([".venv/bin/python", "benchmarks/bench_chat_session.py", *sys.argv[1:]]),
        model=model, context=ctx, turns=args.turns, user_tokens=args.user_tokens, reply_tokens=args.reply_tokens,
        text=args.text, book=args.book, sink_tokens=args.sink_tokens, sink_window=args.sink_window,
        repeats=args.repeats, pin=args.pin, serve_args=serve_args, vllm=vllm.__version__, cpus=os.cpu_count(),
        load_avg_start=os.getloadavg(), **{k: os.environ.get(k) for k in THREAD_ENV},
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", SERVER_ENV["VLLM_CPU_KVCACHE_SPACE"]))
    print(settings["command"])
    print("chat sessions: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "command"), flush=True)

    term = Terminal()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(prepare.cache_dir()) / "bench-chat"
    sides = {"on": [], "off": ["--no-enable-prefix-caching"]}
    servers: dict[str, dict] = {}
    try:
        for i, (name, extra) in enumerate(sides.items()):
            (logs / name).mkdir(parents=True, exist_ok=True)
            proc, base, log, cmd = start_server(model, args, serve_args + extra, logs / name, term, quiet=True)
            if args.pin:
                os.sched_setaffinity(proc.pid, {i % os.cpu_count()})  # children inherit it
            servers[name] = dict(proc=proc, base=base, log=log, cmd=cmd)
            print(f"server {name:>3} (prefix caching {name}): $ {shlex.join(['vllm', *cmd[1:]])}")
            print(f"           log: {log.path}")
        t0 = time.time()
        for name, s in servers.items():
            wait_healthy(s["base"], s["proc"], s["log"], term, args.timeout)
            s["cpu"] = TreeCPU(s["proc"].pid)
            pool, bs = kv_pool(s["base"])
            print(f"server {name:>3} ready after {time.time() - t0:.0f} s; KV pool {pool} blocks of {bs} tokens")
            settings["block_size"], settings[f"kv_pool_blocks_{name}"] = bs, pool
        # one short unrelated chat each: first-request effects out of the measured turns
        for name, s in servers.items():
            warm = random_messages(tokens, 200, 1, seed=99)[0]
            chat_turn(s["base"], model, [{"role": "user", "content": warm}], args)
        raw = run(servers, model, sessions, args, term, ctx)
    finally:
        for s in servers.values():
            stop(s["proc"])
    settings["load_avg_end"] = os.getloadavg()
    report(raw, settings, args, out, ctx)


def run(servers, model, sessions, args, term, ctx) -> list[list[dict]]:
    """raw[repeat][turn] = {"on": result, "off": result, "first": which went first}."""
    raw = []
    t_start = time.time()
    n_total = len(sessions) * args.turns
    for rep, texts in enumerate(sessions):
        history = [{"role": "system", "content": DEFAULT_SYSTEM}]
        turns = []
        for k, text in enumerate(texts, start=1):
            history.append({"role": "user", "content": text})
            order = ["on", "off"] if (k + rep) % 2 else ["off", "on"]
            res = {"first": order[0]}
            for name in order:
                s = servers[name]
                done = rep * args.turns + k - 1

                def status(n_text, answering, secs, name=name, k=k):
                    term.status(f"[{done}/{n_total} turns, {time.time() - t_start:.0f} s] session {rep + 1} "
                                f"turn {k} on caching-{name}: "
                                + ("replying" if answering else f"prefill {secs:.1f} s"))

                res[name] = chat_turn(s["base"], model, history, args, on_event=status, cpu_clock=s["cpu"])
                res[name]["load_avg"] = os.getloadavg()[0]
            term.end_status()
            history.append({"role": "assistant", "content": res["on"]["reply"]})
            on, off = res["on"], res["off"]
            print(f"session {rep + 1} turn {k:>2} | prompt {on['prompt_tokens']:>6,} | TTFT on {on['ttft_s']:6.2f} s "
                  f"off {off['ttft_s']:6.2f} s | hit {100 * on['hit_share']:3.0f}% | CPU-s to 1st token on "
                  f"{on['cpu_to_first_s']:6.2f} off {off['cpu_to_first_s']:6.2f} | same reply "
                  f"{on['reply'] == off['reply']}", flush=True)
            for r in (on, off):
                r["same_reply"] = on["reply"] == off["reply"]
            turns.append(res)
        raw.append(turns)
    return raw


def report(raw, settings, args, out: Path, ctx) -> None:
    table = []
    for k in range(args.turns):
        per = [rep[k] for rep in raw]
        e = {"turn": k + 1, "prompt_tokens": median(p["on"]["prompt_tokens"] for p in per)}
        for side in ("on", "off"):
            for f in ("ttft_s", "cpu_to_first_s", "cpu_s", "total_s", "hit_share", "cached_tokens"):
                e[f"{f}_{side}"] = median(p[side][f] for p in per)
        e["ttft_ratio"] = e["ttft_s_off"] / e["ttft_s_on"]
        e["cpu_first_ratio"] = e["cpu_to_first_s_off"] / e["cpu_to_first_s_on"]
        e["same_reply"] = sum(p["on"]["same_reply"] for p in per)
        table.append(e)
    heads = ["turn", "prompt tokens", "x ctx", "TTFT on (s)", "TTFT off (s)", "off / on", "hit share on",
             "CPU-s to 1st token on", "off", "off / on", "CPU-s turn on / off", "same reply"]
    print(f"\nmedian of {args.repeats} session(s); on = prefix caching (vLLM's default), off = "
          f"--no-enable-prefix-caching; both --kv-policy streaming-sink S={args.sink_tokens} W={args.sink_window}\n")
    print("| " + " | ".join(heads) + " |")
    print("|" + "---:|" * len(heads))
    for e in table:
        cells = [e["turn"], f"{e['prompt_tokens']:,.0f}", f"{e['prompt_tokens'] / ctx:.2f}" if ctx else "",
                 f"{e['ttft_s_on']:.2f}", f"{e['ttft_s_off']:.2f}", f"{e['ttft_ratio']:.1f}",
                 f"{100 * e['hit_share_on']:.0f}%", f"{e['cpu_to_first_s_on']:.2f}", f"{e['cpu_to_first_s_off']:.2f}",
                 f"{e['cpu_first_ratio']:.1f}", f"{e['cpu_s_on']:.1f} / {e['cpu_s_off']:.1f}",
                 f"{e['same_reply']}/{args.repeats}"]
        print("| " + " | ".join(map(str, cells)) + " |")

    summary = {}
    if len(table) >= 2:
        t2, tn = table[1], table[min(29, len(table) - 1)]
        summary = dict(
            turn_a=2, turn_b=tn["turn"],
            ttft_on=(t2["ttft_s_on"], tn["ttft_s_on"]), ttft_off=(t2["ttft_s_off"], tn["ttft_s_off"]),
            ttft_on_growth=tn["ttft_s_on"] / t2["ttft_s_on"], ttft_off_growth=tn["ttft_s_off"] / t2["ttft_s_off"],
            cpu_first_on=(t2["cpu_to_first_s_on"], tn["cpu_to_first_s_on"]),
            cpu_first_off=(t2["cpu_to_first_s_off"], tn["cpu_to_first_s_off"]),
            hit_share_on_turns_2_on=median(e["hit_share_on"] for e in table[1:]),
            min_hit_share_on_turns_2_on=min(e["hit_share_on"] for e in table[1:]))
        # caching off: TTFT against prompt tokens, least squares (is it linear?)
        xs = [e["prompt_tokens"] for e in table]
        ys = [e["ttft_s_off"] for e in table]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
        ss_tot = sum((y - my) ** 2 for y in ys)
        summary.update(off_s_per_1k_prompt_tokens=1000 * slope, off_linear_r2=1 - ss_res / ss_tot if ss_tot else 1.0)
        print(f"\nturn 2 -> turn {tn['turn']}: TTFT caching on {t2['ttft_s_on']:.2f} -> {tn['ttft_s_on']:.2f} s "
              f"({summary['ttft_on_growth']:.2f}x; goal <= 1.5x), caching off {t2['ttft_s_off']:.2f} -> "
              f"{tn['ttft_s_off']:.2f} s ({summary['ttft_off_growth']:.1f}x); CPU-s to first token on "
              f"{t2['cpu_to_first_s_on']:.2f} -> {tn['cpu_to_first_s_on']:.2f}, off {t2['cpu_to_first_s_off']:.2f} "
              f"-> {tn['cpu_to_first_s_off']:.2f}")
        print(f"caching off: TTFT = {summary['off_s_per_1k_prompt_tokens']:.2f} s per 1k prompt tokens "
              f"(linear fit R^2 {summary['off_linear_r2']:.3f}); caching on: median hit share turns 2-"
              f"{len(table)} {100 * summary['hit_share_on_turns_2_on']:.0f}% "
              f"(lowest {100 * summary['min_hit_share_on_turns_2_on']:.0f}%)")
    print(f"load average {settings['load_avg_start'][0]:.1f} -> {settings['load_avg_end'][0]:.1f}")

    path = Path(args.json) if args.json else out / "chat-sessions.json"
    for rep in raw:
        for t in rep:
            for side in ("on", "off"):
                t[side].pop("reply", None)
    path.write_text(json.dumps(dict(settings=settings, summary=summary, table=table, raw=raw), indent=1))
    print(f"raw figures: {path}")
    png = out / "chat-sessions.png"
    plot(table, png, settings, ctx)
    print(f"plot: {png}")


def plot(table, path: Path, settings, ctx) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["turn"] for e in table]
    fig, ax = plt.subplots(figsize=(7.0, 3.9), dpi=100)
    ax.plot(xs, [e["ttft_s_off"] for e in table], "o-", ms=3, color="tab:red", label="TTFT, prefix caching off")
    ax.plot(xs, [e["ttft_s_on"] for e in table], "o-", ms=3, color="tab:blue", label="TTFT, prefix caching on")
    ax.plot(xs, [e["cpu_to_first_s_off"] for e in table], "--", lw=1, color="tab:red",
            label="server CPU-s to first token, off")
    ax.plot(xs, [e["cpu_to_first_s_on"] for e in table], "--", lw=1, color="tab:blue",
            label="server CPU-s to first token, on")
    ax.set_xlabel("turn")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("seconds to the first token")
    ax.set_ylim(0, max(e["ttft_s_off"] for e in table) * 1.1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [e["prompt_tokens"] for e in table], color="gray", lw=1, ls=":", label="prompt tokens (right)")
    if ctx:
        ax2.axhline(ctx, color="gray", lw=0.8, ls="--")
        ax2.annotate(f"model context {ctx:,}", (xs[0], ctx), xytext=(2, 3), textcoords="offset points",
                     fontsize=7, color="gray")
    ax2.set_ylabel("prompt tokens")
    ax2.set_ylim(0, max(e["prompt_tokens"] for e in table) * 1.1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set_title(f"{len(table)}-turn chat, {Path(settings['model']).name}, {settings['cpus']} CPU cores, "
                 f"streaming-sink S={settings['sink_tokens']} W={settings['sink_window']}\nsame prompts on both "
                 f"servers, interleaved; median of {settings['repeats']} session(s)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
