"""What pinning the system prompt buys: recall of a fact given only in the system prompt, asked at
depths past the window and past 2x the model's context, pinned (sinks = the system turn) vs
StreamingLLM's 4 sink tokens. Real `vllm serve --kv-policy streaming-sink` servers, the chat
completions API with the model's own chat template.

The items. ``--prompts`` system prompts (default 8) of one fixed text: a persona and rules of a
reading companion (~110 tokens) with four facts in its middle: a secret codeword, the assistant's
name, the user's city and the user's favourite colour. Each fact is one of 8 words of its category,
every word a single token, so every system prompt has the same length (a server-wide
``--sink-tokens`` can pin all of them) and every word is the answer of exactly one system prompt
per category (a Latin square: a model's prior for a word cannot make it look right more often
than chance). Nothing else in the conversation names them.

The conversation. After the system prompt, user turns of ~300-token consecutive passages of
Austen's *Emma* (each system prompt its own stretch of the book) answered by short canned
assistant replies, so that the only source of the facts is the system turn.

The probes. At each ``--depths`` target (prompt tokens before the probe; default 0 (right after
the system prompt), 500 (inside the window: the dense regime, where both arms are the stock
engine), 2048 (2x the window), 8192 (1x the context), 16384 (2x the context)) each system prompt
gets one probe per fact (targets from ``--deep-from`` 4096 on: the first ``--deep-prompts`` 2
system prompts only, as each costs a ~17k-token prefill per arm): the history so far, a user question ("What is the secret codeword?") and
the start of the assistant's answer ("The secret codeword is"), continued by the server
(``continue_final_message``). One request per probe, temperature 0, 1 token, with
``logprob_token_ids`` = the category's 8 candidate tokens: their full-vocabulary logprobs at the
answer position. Measured per (arm, depth), over prompts x facts (32 probes by default):
- forced-choice accuracy: the correct word has the highest logprob of the 8 (chance 1/8);
- the correct word's probability share among the 8 (chance 0.125 on average);
- greedy recall: the greedy next token over the whole vocabulary is the correct word.

The arms. ``pinned``: sinks = the system turn's tokens (S = its length, the same for every system
prompt here); ``sink4``: ``--sink-tokens 4`` (the first 4 tokens of the system turn, StreamingLLM's
setting). Same prompts, same servers' other flags, temperature 0. Two ways to run them
(``--mode``):
- ``request`` (default): one server ``--sink-tokens system``: every chat request's sinks are its
  rendered system turn; the sink4 arm's requests say ``vllm_xargs: {"sink_tokens": 4}``.
- ``flag``: two servers, ``--sink-tokens S`` and ``--sink-tokens 4`` (what a server-wide flag can
  do; the same attention as the per-request mode for these fixed-length system prompts).
Each probe goes to both arms at once (one batch on one server, or both servers busy), in one order.

Window: ``--sink-window 1024`` (the default, as docs/chat-sessions.md): with ~400-token turns the
system prompt leaves a 4-sink server's window by the third filler turn, so past-the-window depths
come cheap, and a prefill step past the window attends S + 1024 keys (the cost per token does not
grow with depth). Past the window, the attention a probe gets is the same at every depth by the
contract (sinks + the last W tokens, at the same positions); the deep probes check that in
practice and meet the issue's "past 2x the context".

Cost: each system prompt's history is prefilled once per arm up to its deepest target (prefix
caching resumes every probe and depth from the previous one): ~2.2k tokens x 8 prompts + ~17k x 2
prompts, per arm, at the defaults; the JSON is rewritten after every (prompt, depth), so an
interrupted run keeps what it measured (``--replot`` summarizes and redraws it). Servers run ``--enforce-eager`` (no torch.compile: a new ``--sink-tokens`` value
would compile for minutes; quality does not depend on it).

    .venv/bin/python benchmarks/bench_system_prompt_pinning.py                 # docs/system-prompt-pinning.{json,png}
    .venv/bin/python benchmarks/bench_system_prompt_pinning.py --mode flag     # today's server-wide flag
    .venv/bin/python benchmarks/bench_system_prompt_pinning.py --smoke --out /tmp/pin   # ~3 min check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from chat_session import SERVER_ENV, Tokens, model_context, start_server, system_turn_tokens  # noqa: E402
from stream_past_context import Terminal, kv_pool, stop, wait_healthy  # noqa: E402

# One system prompt text; {codeword} etc. are single-token words, so every variant has one length.
SYSTEM_TEMPLATE = (
    "You are a patient reading companion. The user reads a novel to you one passage at a time. "
    "Remember these facts for the whole conversation. Your name is{name}. The secret codeword "
    "is{codeword}. The user lives in{city}. The user's favourite colour is{color}. When the user "
    "asks about any of these facts, answer with the fact in one short sentence. Otherwise reply "
    "briefly and kindly, and never invent events that are not in the passage.")
# category -> (candidate words, question, the start of the answer)
FACTS = {
    "codeword": ("Falcon Copper Glacier Pepper Saturn Thunder Rocket Dragon".split(),
                 "What is the secret codeword?", "The secret codeword is"),
    "name": ("Oliver Sophia Marcus Victor Clara Hugo Nina Felix".split(),
             "What is your name?", "My name is"),
    "city": ("Paris Tokyo Berlin Madrid Rome Cairo Moscow Sydney".split(),
             "Which city do I live in?", "You live in"),
    "color": ("red blue green yellow purple orange pink silver".split(),
              "What is my favourite colour?", "Your favourite colour is"),
}
SHIFT = {"codeword": 0, "name": 3, "city": 5, "color": 6}  # Latin square: prompt k's word per category
REPLIES = ["Thank you, please go on.", "I see. What happens next?", "Noted. Please continue reading.",
           "How interesting. Go on, please."]
ARMS = ("pinned", "sink4")
DEFAULT_DEPTHS = "0,500,2048,8192,16384"


def system_prompts(n: int) -> list[dict]:
    """n system prompts: facts of prompt k are word (k + SHIFT[cat]) % 8 of each category."""
    out = []
    for k in range(n):
        facts = {c: FACTS[c][0][(k + SHIFT[c]) % len(FACTS[c][0])] for c in FACTS}
        out.append(dict(system=SYSTEM_TEMPLATE.format(**{c: " " + w for c, w in facts.items()}), facts=facts))
    return out


def candidate_ids(tok) -> dict[str, list[int]]:
    """Each category's candidates as single tokens (with their leading space)."""
    ids = {}
    for c, (words, _, _) in FACTS.items():
        ids[c] = []
        for w in words:
            t = tok(" " + w, add_special_tokens=False)["input_ids"]
            if len(t) != 1:
                sys.exit(f"candidate {w!r} is {len(t)} tokens for this tokenizer; the benchmark needs single-token "
                         "words (edit FACTS)")
            ids[c].append(t[0])
        if len(set(ids[c])) != len(ids[c]):
            sys.exit(f"two candidates of {c} share a token")
    return ids


def filler_turns(text: str, tokens: Tokens, n_tokens: int, count: int, skip: int) -> list[list[dict]]:
    """``count`` (user, assistant) pairs: consecutive passages of the book, canned replies."""
    from chat_session import user_messages

    passages = user_messages(text, tokens, n_tokens, count, skip=skip)
    out = []
    for k, p in enumerate(passages):
        body = p.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]  # the passage without the question
        out.append([{"role": "user", "content": "Here is the next passage:\n\n" + body},
                    {"role": "assistant", "content": REPLIES[k % len(REPLIES)]}])
    return out


def probe_messages(history: list[dict], cat: str) -> list[dict]:
    _, question, answer = FACTS[cat]
    return history + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def rendered_len(tok, messages: list[dict]) -> int:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def plan(tok, prompts, filler: list[list[list[dict]]], depths: list[int], deep_from: int,
         deep_prompts: int) -> list[list[tuple[int, int]]]:
    """Per system prompt: [(depth target, filler turns before the probe)]: the fewest turns whose
    history reaches the target (the deep targets only for the first ``deep_prompts`` prompts)."""
    out = []
    for k, (p, turns) in enumerate(zip(prompts, filler)):
        n, msgs, rows = 0, [{"role": "system", "content": p["system"]}], []
        length = rendered_len(tok, msgs)
        for d in depths:
            if d >= deep_from and k >= deep_prompts:
                break
            while length < d:
                if n >= len(turns):
                    sys.exit(f"depth {d}: the filler ran out at {length} tokens")
                msgs = msgs + turns[n]
                n += 1
                length = rendered_len(tok, msgs)
            rows.append((d, n))
        out.append(rows)
    return out


def ask(base: str, model: str, messages: list[dict], ids: list[int], xargs: dict | None) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True,
            "logprobs": True, "logprob_token_ids": ids,
            "return_tokens_as_token_ids": True}
    if xargs:
        body["vllm_xargs"] = xargs
    t0 = time.perf_counter()
    r = requests.post(base + "/v1/chat/completions", json=body, timeout=3600)
    if r.status_code != 200:
        sys.exit(f"the server answered {r.status_code}: {r.text[:1000]}")
    doc = r.json()
    choice = doc["choices"][0]
    first = choice["logprobs"]["content"][0]
    # return_tokens_as_token_ids: entries are "token_id:N"; the sampled token comes first, then the asked ids
    by_id = {int(e["token"].split(":", 1)[1]): e["logprob"] for e in first.get("top_logprobs") or []}
    if any(i not in by_id for i in ids):
        sys.exit(f"the server did not return every candidate's logprob: {json.dumps(first)[:500]}")
    usage = doc["usage"]
    sampled = int(first["token"].split(":", 1)[1])
    return dict(logprobs=[by_id[i] for i in ids], text=choice["message"]["content"] or "", sampled=sampled,
                prompt_tokens=usage["prompt_tokens"],
                cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                wall_s=time.perf_counter() - t0)


def score(rec: dict, cat: str, word: str, ids: list[int]) -> dict:
    i = FACTS[cat][0].index(word)
    lp = rec["logprobs"]
    m = max(lp)
    z = sum(math.exp(x - m) for x in lp)
    return dict(correct=lp[i] == m and lp.count(m) == 1, share=math.exp(lp[i] - m) / z,
                rank=1 + sum(x > lp[i] for x in lp), recall=rec["sampled"] == ids[i], logprob=lp[i])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder with a chat template (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--mode", choices=["request", "flag"], default="request",
                    help="request: one server --sink-tokens system, sink4 requests via vllm_xargs (default); "
                         "flag: two servers, --sink-tokens S and --sink-tokens 4")
    ap.add_argument("--prompts", type=int, default=8, help="system prompts (default 8, at most 8)")
    ap.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"prompt tokens before each probe (default {DEFAULT_DEPTHS})")
    ap.add_argument("--deep-from", type=int, default=4096,
                    help="depths from this many tokens on are probed for --deep-prompts prompts only (default 4096)")
    ap.add_argument("--deep-prompts", type=int, default=2, help="system prompts probed at the deep depths (default 2)")
    ap.add_argument("--user-tokens", type=int, default=300, help="tokens of each filler passage (default 300)")
    ap.add_argument("--book", default="emma")
    ap.add_argument("--sink-window", type=int, default=1024, help="both arms (default 1024)")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--smoke", action="store_true",
                    help="a quick check: 2 system prompts, depths 0,1500, --sink-window 512")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for system-prompt-pinning.png/.json")
    ap.add_argument("--name", default="system-prompt-pinning", help="file name stem (default system-prompt-pinning)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for a server to start")
    ap.add_argument("--plan-only", action="store_true", help="print the system turn's length and the probe "
                                                               "schedule, start no server")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot from this run's JSON")
    args, serve_args = ap.parse_known_args()  # the rest goes to `vllm serve`
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        doc = json.loads(Path(args.replot).read_text())
        st = doc["settings"]
        doc["table"] = summarize(doc["records"], st["depths"], st["sink_window"], st["system_turn_tokens"])
        Path(args.replot).write_text(json.dumps(doc, indent=1))
        plot(doc, out / f"{args.name}.png")
        return
    if args.smoke:
        args.prompts, args.depths, args.sink_window = 2, "0,1500", 512
    depths = sorted(int(d) for d in args.depths.split(","))
    if not 1 <= args.prompts <= 8:
        ap.error("--prompts: 1 to 8")
    for k, v in {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}.items():
        os.environ.setdefault(k, v)

    from transformers import AutoTokenizer

    from streaming_sink_tools import prepare

    model = args.model or prepare.default_model_path()
    tok = AutoTokenizer.from_pretrained(model)
    tok.model_max_length = 1 << 30  # whole histories are counted here, longer than the context
    ctx = model_context(model)
    tokens = Tokens(tok)
    prompts = system_prompts(args.prompts)
    sys_len = {system_turn_tokens(tok, p["system"]) for p in prompts}
    if len(sys_len) != 1:
        sys.exit(f"the system prompts differ in length ({sorted(sys_len)}): the flag mode cannot pin them all")
    S = sys_len.pop()
    ids = candidate_ids(tok)
    deep = [d for d in depths if d >= args.deep_from]
    n_turns = int(max(depths) / (0.8 * args.user_tokens)) + 3  # passages run 0.9-1.15x --user-tokens
    book = prepare.corpus_text(args.book)
    filler = [filler_turns(book, tokens, args.user_tokens, n_turns if k < args.deep_prompts or not deep
                           else int(max(depths[:len(depths) - len(deep)] or [0]) / (0.8 * args.user_tokens)) + 3,
                           skip=k * n_turns) for k in range(args.prompts)]
    schedule = plan(tok, prompts, filler, depths, args.deep_from, args.deep_prompts)

    print(f"system turn {S} tokens; probes (prompt, depth target -> filler turns): "
          + "; ".join(f"{k}: " + ", ".join(f"{d}->{n}" for d, n in rows) for k, rows in enumerate(schedule)), flush=True)
    if args.plan_only:
        return
    import vllm

    settings = dict(
        command="$ " + shlex.join([".venv/bin/python", "benchmarks/bench_system_prompt_pinning.py", *sys.argv[1:]]),
        model=model, context=ctx, mode=args.mode, prompts=args.prompts, depths=depths, system_turn_tokens=S,
        sink_window=args.sink_window, user_tokens=args.user_tokens, book=args.book, serve_args=serve_args,
        system_template=SYSTEM_TEMPLATE, facts={c: dict(words=w, question=q, answer=a) for c, (w, q, a) in FACTS.items()},
        vllm=vllm.__version__, cpus=os.cpu_count(), load_avg_start=os.getloadavg(),
        **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")})
    print(settings["command"])
    print(f"system prompts: {args.prompts} x {len(FACTS)} facts, system turn {S} tokens; depths {depths}; "
          f"window {args.sink_window}; mode {args.mode}", flush=True)

    # arm -> (server settings, per-request vllm_xargs)
    if args.mode == "request":
        servers_wanted = {"system": "system"}
        arms = {"pinned": ("system", None), "sink4": ("system", {"sink_tokens": 4})}
    else:
        servers_wanted = {"pinned": S, "sink4": 4}
        arms = {"pinned": ("pinned", None), "sink4": ("sink4", None)}
    term = Terminal()
    logs = Path(prepare.cache_dir()) / "bench-pinning"
    servers: dict[str, dict] = {}
    records = []
    t_start = time.time()
    try:
        for name, sink in servers_wanted.items():
            (logs / name).mkdir(parents=True, exist_ok=True)
            sa = argparse.Namespace(max_model_len=args.max_model_len, sink_tokens=sink,
                                    sink_window=args.sink_window, enforce_eager=True)
            proc, base, log, cmd = start_server(model, sa, serve_args, logs / name, term, quiet=True)
            servers[name] = dict(proc=proc, base=base, log=log, cmd=cmd)
            print(f"server {name}: $ {shlex.join(['vllm', *cmd[1:]])}\n        log: {log.path}", flush=True)
        for name, s in servers.items():
            wait_healthy(s["base"], s["proc"], s["log"], term, args.timeout)
            pool, bs = kv_pool(s["base"])
            settings[f"kv_pool_blocks_{name}"], settings["block_size"] = pool, bs
            settings[f"server_{name}"] = shlex.join(["vllm", *s["cmd"][1:]])
            print(f"server {name} ready after {time.time() - t_start:.0f} s; KV pool {pool} blocks of {bs}", flush=True)
        # the jobs: every prompt at the shallow depths first, then the deep ones for --deep-prompts prompts
        jobs = [(k, d, n) for k in range(args.prompts) for d, n in schedule[k] if d < args.deep_from]
        jobs += [(k, d, n) for k in range(min(args.deep_prompts, args.prompts)) for d, n in schedule[k]
                 if d >= args.deep_from]
        total, done = len(jobs) * len(FACTS), 0
        path = out / f"{args.name}.json"
        pool = ThreadPoolExecutor(len(arms))
        for k, d, n in jobs:
            p = prompts[k]
            history = [{"role": "system", "content": p["system"]}] + [m for t in filler[k][:n] for m in t]
            for cat in FACTS:
                msgs = probe_messages(history, cat)
                # both arms at once (one server: one batch; two servers: both busy), same prompt
                futs = {arm: pool.submit(ask, servers[srv]["base"], model, msgs, ids[cat], xargs)
                        for arm, (srv, xargs) in arms.items()}
                for arm, fut in futs.items():
                    rec = fut.result()
                    rec.update(arm=arm, prompt=k, depth_target=d, filler_turns=n, fact=cat,
                               word=p["facts"][cat], **score(rec, cat, p["facts"][cat], ids[cat]))
                    records.append(rec)
                done += 1
                a, b = records[-2], records[-1]
                print(f"[{done}/{total}, {time.time() - t_start:.0f} s] prompt {k} depth {a['prompt_tokens']:>6,} "
                      f"{cat:>8}={p['facts'][cat]:<8} | pinned {'ok' if a['correct'] else '--'} share "
                      f"{a['share']:.2f} greedy {tok.decode([a['sampled']])!r:<10} | sink4 "
                      f"{'ok' if b['correct'] else '--'} share {b['share']:.2f} greedy {tok.decode([b['sampled']])!r}",
                      flush=True)
            # what is done so far survives an interrupted run (--replot redraws from it)
            path.write_text(json.dumps(dict(settings=settings, records=records), indent=1))
    finally:
        for s in servers.values():
            stop(s["proc"])
    settings["load_avg_end"] = os.getloadavg()
    settings["wall_s"] = time.time() - t_start
    doc = dict(settings=settings, table=summarize(records, depths, args.sink_window, S), records=records)
    path.write_text(json.dumps(doc, indent=1))
    print(f"raw figures: {path}")
    plot(doc, out / f"{args.name}.png")
    print(f"plot: {out / (args.name + '.png')}")


def summarize(records: list[dict], depths: list[int], window: int, S: int) -> list[dict]:
    table = []
    for d in depths:
        rows = [r for r in records if r["depth_target"] == d]
        if not rows:
            continue
        e = dict(depth_target=d, prompt_tokens=sorted(r["prompt_tokens"] for r in rows)[len(rows) // 2])
        for arm in ARMS:
            rs = [r for r in rows if r["arm"] == arm]
            n = len(rs)
            k = sum(r["correct"] for r in rs)
            e[arm] = dict(n=n, correct=k, accuracy=k / n if n else None, accuracy_ci95=wilson(k, n),
                          share=sum(r["share"] for r in rs) / n if n else None,
                          recall=sum(r["recall"] for r in rs) / n if n else None,
                          mean_rank=sum(r["rank"] for r in rs) / n if n else None,
                          by_fact={c: sum(r["correct"] for r in rs if r["fact"] == c) for c in FACTS})
        pa = [r for r in rows if r["arm"] == "pinned"]
        pb = [r for r in rows if r["arm"] == "sink4"]
        e["max_abs_logprob_diff"] = max((abs(x - y) for a, b in zip(pa, pb)
                                         for x, y in zip(a["logprobs"], b["logprobs"])), default=None)
        table.append(e)
    heads = ["depth target", "prompt tokens (median)", "past the window?", "pinned: accuracy (95% CI)",
             "share", "greedy recall", "sink4: accuracy (95% CI)", "share", "greedy recall", "max |dlogprob|"]
    print(f"\nforced choice among 8 single-token candidates (chance 12.5%); pinned = the {S}-token system turn "
          f"as the sink, sink4 = 4 sink tokens; window {window}\n")
    print("| " + " | ".join(heads) + " |")
    print("|" + "---:|" * len(heads))
    for e in table:
        cells = [f"{e['depth_target']:,}", f"{e['prompt_tokens']:,}",
                 "yes" if e["prompt_tokens"] > window + 4 else "no"]
        for arm in ARMS:
            a = e[arm]
            lo, hi = a["accuracy_ci95"]
            cells += [f"{a['correct']}/{a['n']} = {100 * a['accuracy']:.0f}% ({100 * lo:.0f}-{100 * hi:.0f})",
                      f"{a['share']:.2f}", f"{100 * a['recall']:.0f}%"]
        cells.append(f"{e['max_abs_logprob_diff']:.3g}")
        print("| " + " | ".join(cells) + " |")
    return table


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, st = doc["table"], doc["settings"]
    xs = [max(e["prompt_tokens"], 1) for e in table]
    fig, ax = plt.subplots(figsize=(7.0, 3.9), dpi=100)
    colors = {"pinned": "tab:blue", "sink4": "tab:red"}
    labels = {"pinned": f"pinned: sinks = the {st['system_turn_tokens']}-token system turn",
              "sink4": "4 sink tokens (StreamingLLM)"}
    for arm in ARMS:
        acc = [100 * e[arm]["accuracy"] for e in table]
        lo = [100 * (e[arm]["accuracy"] - e[arm]["accuracy_ci95"][0]) for e in table]
        hi = [100 * (e[arm]["accuracy_ci95"][1] - e[arm]["accuracy"]) for e in table]
        ax.errorbar(xs, acc, yerr=[lo, hi], fmt="o-", ms=4, capsize=3, color=colors[arm],
                    label=labels[arm] + ": forced choice")
        ax.plot(xs, [100 * e[arm]["recall"] for e in table], "s--", ms=3, lw=1, color=colors[arm],
                label=labels[arm] + ": greedy recall")
    ax.axhline(100 / 8, color="gray", lw=0.8, ls=":")
    ax.annotate("chance (1 of 8)", (max(xs) * 1.4, 100 / 8), xytext=(0, 3), textcoords="offset points",
                fontsize=7, color="gray", ha="right")
    marks = [(st["sink_window"], f"window {st['sink_window']}", "--")]
    if st.get("context"):
        marks += [(m * st["context"], f"{m}x context", "-.") for m in (1, 2)]
    for x, text, ls in marks:
        ax.axvline(x, color="gray", lw=0.8, ls=ls)
        ax.annotate(text, (x, 50), xytext=(-3, 0), textcoords="offset points", fontsize=7, color="gray",
                    rotation=90, ha="right", va="center")
    for e, x in zip(table, xs):  # how many probes a point stands for, where it is not the most
        if e["pinned"]["n"] != max(t["pinned"]["n"] for t in table):
            ax.annotate(f"n={e['pinned']['n']}", (x, 104), fontsize=7, color="gray", ha="center")
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    ax.set_xlabel("prompt tokens before the question (log scale)")
    ax.set_ylabel("% of probes answered correctly")
    ax.set_ylim(-3, 110)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    n = max(e["pinned"]["n"] for e in table)
    ax.set_title(f"Recall of a fact given only in the system prompt, {Path(st['model']).name}, "
                 f"window {st['sink_window']}, {st['mode']} mode\n{n} probes per point ({st['prompts']} system "
                 f"prompts x 4 facts; n= where fewer), temperature 0; bars: 95% Wilson intervals", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
