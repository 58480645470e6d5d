"""A long multi-turn chat through a real `vllm serve --kv-policy streaming-sink`, turn by turn.

Drives the OpenAI chat completions API (the model's own chat template) through one session of
many turns: every turn sends the whole history (system prompt, every user message and reply so
far) plus a new user message, as chat clients do, and the session runs past the model's context
(by default to 2x it). With prefix caching (vLLM's default, kept under the policy) the server
resumes each turn from the cached sink + window blocks of the previous one and computes only the
new tokens, so the time to the first token stays flat while the history grows; without it every
turn re-prefills the whole history. Per turn it prints the prompt length, the time to first token
(TTFT), the tokens the server took from its prefix cache (``usage.prompt_tokens_details.
cached_tokens``: the server needs ``--enable-prompt-tokens-details``, which this script passes
when it starts the server) and their share of the prompt.

    .venv/bin/python examples/chat_session.py                          # starts the server: SmolLM2
    .venv/bin/python examples/chat_session.py --system-prompt-as-sink  # the system prompt is the sink
    .venv/bin/python examples/chat_session.py --sessions 2 --turns 12 --probe-unpinned  # two system prompts
    .venv/bin/python examples/chat_session.py --base-url http://127.0.0.1:8000 --turns 10

User messages are consecutive passages of Austen's *Emma* (the offline corpus of
``streaming-sink-prepare``), each with a question about it; ``--text random`` uses seeded random
words instead (no corpus needed). Replies are ``--reply-tokens`` long at most (``--ignore-eos``:
exactly), temperature 0 by default.

The system prompt as the attention sink (``--system-prompt-as-sink``): the server starts with
``--sink-tokens system``, so each chat request's sinks are its own rendered system turn: the system
prompt's KV stays in the cache for the whole session (the model keeps seeing its instructions
however far the chat goes) and its full KV blocks are computed once and shared by every session
that starts with it. The script prints the system turn's length in tokens (what the server pins).
With a vLLM plugin older than per-request sinks it starts ``--sink-tokens`` = that length instead
(one system prompt per server).

Two system prompts on one server (``--sessions 2``, implies ``--system-prompt-as-sink``): two
sessions at once, each with its own system prompt (by default two personas, "Oliver" and "Clara";
``--system-prompt`` twice for your own), each pinned to its own system turn. At the end each
session is asked ``--probe`` (default "What is your name?" for the default personas) past the
window; ``--probe-unpinned`` asks it again with ``vllm_xargs: {"sink_tokens": 4}`` (StreamingLLM's
4 sinks: the system prompt has left the window), to compare. More: docs/chat-sessions.md.

Default model: the embedded SmolLM2-135M-Instruct (8192-token context), prepared on first use.
Options this script does not know (``--dtype``, ``--block-size``, ``--no-enable-prefix-caching``,
...) go to ``vllm serve``. Output: ``turns.json``, ``turns.csv``, ``turns.png`` (TTFT and cache hit
share per turn) and ``server.log`` in ``~/.cache/streaming-sink/chat`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream_past_context import (ServerLog, Terminal, free_port, kv_pool, stop,  # noqa: E402
                                 vllm_command, wait_healthy)

DEFAULT_SYSTEM = (
    "You are a friendly literary companion. The user is reading Jane Austen's novel Emma aloud to "
    "you, one passage at a time. After each passage, answer the user's question about it in two or "
    "three plain sentences: who is speaking, what they want, and what it tells us about them. Never "
    "invent events that are not in the passage.")
# --sessions 2 without --system-prompt: two personas, each asked its name at the end.
PERSONAS = [
    (DEFAULT_SYSTEM + " Your name is Oliver.", "Oliver"),
    ("You are a strict literature teacher. Your name is Clara. The user is reading Jane Austen's novel Emma aloud to "
     "you, one passage at a time. After each passage, ask the user one short question that checks "
     "whether they understood it, and never give the answer away.", "Clara"),
]
NAME_PROBE = "What is your name?"
QUESTIONS = [
    "What is happening in this passage?",
    "Who speaks here, and what do they want?",
    "What does this passage tell us about Emma?",
    "Sum this passage up in two sentences.",
    "What is the mood of this passage?",
]
WORDS = ("the of and to a in that it was her she he his you had with for as not be but at on "
         "all have by so which this my one were there would could them very what said been no "
         "must more some when their much any such than only into should little Emma Mr Mrs Miss "
         "Harriet Knightley Weston Elton Woodhouse Churchill Fairfax time think know good great "
         "thing well soon never made every nothing always quite being").split()
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}


# ---- text ------------------------------------------------------------------------------------

class Tokens:
    """Token counts with the model's tokenizer: a local one when the model is a folder here, else
    the server's own ``/tokenize`` endpoint (vLLM)."""

    def __init__(self, tok=None, base: str | None = None, model: str | None = None) -> None:
        self.tok, self.base, self.model = tok, base, model

    def count(self, text: str) -> int:
        if self.tok is not None:
            return len(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])
        r = requests.post(self.base + "/tokenize", json={"model": self.model, "prompt": text,
                                                          "add_special_tokens": False}, timeout=60)
        r.raise_for_status()
        return r.json()["count"]


def user_messages(text: str, tokens: Tokens, n_tokens: int, count: int, skip: int = 0) -> list[str]:
    """``count`` consecutive passages of ``text`` of about ``n_tokens`` tokens each (whole sentences,
    the last cut if one sentence is longer), each followed by a question; the first ``skip``
    passages are skipped (another session of the same book)."""
    body = text[text.find("CHAPTER I"):] if "CHAPTER I" in text else text
    sentences = re.split(r"(?<=[.!?\"])\s+", re.sub(r"[ \t]*\n[ \t]*", " ", body))
    out: list[str] = []
    i, have, piece = 0, 0, []
    while len(out) < skip + count:
        if i >= len(sentences):
            sys.exit(f"the text ran out after {len(out)} passages; ask for fewer --turns or shorter messages")
        s = sentences[i]
        i += 1
        n = max(1, math.ceil(len(s) / 4.2))  # cheap estimate; exact counts below
        piece.append(s)
        have += n
        if have >= n_tokens * 0.9:
            passage = " ".join(piece)
            while tokens.count(passage) > n_tokens * 1.15 and len(passage) > 200:
                passage = passage[: int(len(passage) * 0.85)].rsplit(" ", 1)[0] + " ..."
            out.append(passage)
            piece, have = [], 0
    return [f"Here is the next passage:\n\n{p}\n\n{QUESTIONS[k % len(QUESTIONS)]}"
            for k, p in enumerate(out[skip:], start=skip)]


def random_messages(tokens: Tokens, n_tokens: int, count: int, seed: int) -> list[str]:
    """Seeded random words, about ``n_tokens`` tokens a message (no corpus needed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words: list[str] = []
        while not words or tokens.count(" ".join(words)) < n_tokens:
            words += rng.choices(WORDS, k=max(4, n_tokens // 4))
        out.append(" ".join(words))
    return out


# ---- the server -------------------------------------------------------------------------------

def model_context(model: str) -> int | None:
    path = Path(model) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    ctx = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return int(ctx) if ctx else None


def system_turn_tokens(tok, system: str) -> int:
    """Tokens of the system turn alone, as the chat template renders it (a prefix of every prompt
    of the session): the ``--sink-tokens`` that makes the system prompt the sink."""
    msgs = [{"role": "system", "content": system}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    longer = tok.apply_chat_template(msgs + [{"role": "user", "content": "Hello."}], tokenize=False,
                                     add_generation_prompt=True)
    if not longer.startswith(text):
        sys.exit("this chat template does not render the system turn as a prefix of the conversation: "
                 "no fixed --sink-tokens can cover it")
    return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def server_system_tokens(base: str, model: str, system: str) -> int | None:
    """The same, counted by the server (POST /tokenize with messages), to check the local count."""
    try:
        r = requests.post(base + "/tokenize", json={"model": model, "messages": [{"role": "system", "content": system}],
                                                    "add_generation_prompt": False}, timeout=60)
        return r.json()["count"] if r.status_code == 200 else None
    except requests.RequestException:
        return None


def start_server(model: str, args, serve_args: list[str], out: Path, term: Terminal, env: dict | None = None,
                 quiet: bool = False):
    """``vllm serve MODEL --kv-policy streaming-sink ...`` on a free port; returns (process, base URL,
    log, command). ``env`` adds to this process's environment (which wins over SERVER_ENV)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = ServerLog(out / "server.log")
    cmd = vllm_command() + [
        "serve", model, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(args.max_model_len),
        "--kv-policy", "streaming-sink", "--sink-tokens", str(args.sink_tokens),
        "--sink-window", str(args.sink_window),
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens: the hit share
        "--shutdown-timeout", "10",  # on exit the engine tears down by itself (else: "leaked semaphore")
    ] + (["--enforce-eager"] if args.enforce_eager else []) + serve_args
    full_env = {**SERVER_ENV, **os.environ, **(env or {})}
    if not quiet:
        print("$ " + " ".join(["vllm"] + cmd[1:]))
        print(f"server log: {log.path}")
    with open(log.path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)  # one group: cleanup reaches vLLM's workers
    return proc, base, log, cmd


# ---- one turn ---------------------------------------------------------------------------------

def chat_turn(base: str, model: str, messages: list[dict], args, on_event=None, cpu_clock=None) -> dict:
    """One streamed chat completion. Returns the reply text, usage, TTFT (first streamed text),
    total time, and with ``cpu_clock`` (a function returning CPU seconds) the CPU seconds spent
    until the first token and in all."""
    body = {"model": model, "messages": messages, "max_tokens": args.reply_tokens,
            "temperature": args.temperature, "ignore_eos": args.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}
    cpu0 = cpu_clock() if cpu_clock else 0.0
    t0 = time.perf_counter()
    first = first_event = None
    cpu_first = None
    usage, text, finish = None, [], None
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=3600) as r:
        if r.status_code != 200:
            sys.exit(f"the server answered {r.status_code}: {r.text[:1000]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                if first_event is None:
                    first_event = time.perf_counter()
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter()
                        cpu_first = cpu_clock() if cpu_clock else None
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
            if on_event:
                on_event(len(text), first is not None, time.perf_counter() - t0)
    end = time.perf_counter()
    if usage is None:
        sys.exit("the stream ended without usage (stream_options.include_usage)")
    details = usage.get("prompt_tokens_details") or {}
    if first is None:  # every token decoded to nothing: take the first streamed event
        first = first_event or end
    res = dict(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
               cached_tokens=details.get("cached_tokens"), ttft_s=first - t0, total_s=end - t0,
               reply="".join(text), finish_reason=finish)
    res["hit_share"] = (res["cached_tokens"] or 0) / res["prompt_tokens"]
    if cpu_clock:
        cpu_end = cpu_clock()
        res["cpu_to_first_s"] = (cpu_first if cpu_first is not None else cpu_end) - cpu0
        res["cpu_s"] = cpu_end - cpu0
    return res


def row(turn: int, r: dict, ctx: int | None) -> str:
    cached = "n/a" if r["cached_tokens"] is None else f"{r['cached_tokens']:,}"
    x = f" ({r['prompt_tokens'] / ctx:4.2f}x ctx)" if ctx else ""
    return (f"turn {turn:>3} | prompt {r['prompt_tokens']:>7,} tok{x} | cached {cached:>7} "
            f"({100 * r['hit_share']:3.0f}%) | TTFT {r['ttft_s']:6.2f} s | reply {r['completion_tokens']:>4} tok "
            f"in {r['total_s'] - r['ttft_s']:5.1f} s")


def plot(turns: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t["turn"] for t in turns]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(xs, [t["ttft_s"] for t in turns], "o-", color="tab:blue", ms=3, label="time to first token")
    ax.set_xlabel("turn")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("TTFT (s)")
    ax.set_ylim(0, max(t["ttft_s"] for t in turns) * 1.15)
    ax2 = ax.twinx()
    ax2.plot(xs, [t["prompt_tokens"] for t in turns], color="gray", lw=1, ls="--", label="prompt tokens")
    ax2.plot(xs, [t["cached_tokens"] or 0 for t in turns], color="tab:green", lw=1, label="served from cache")
    ax2.set_ylabel("tokens")
    ax2.set_ylim(0, max(t["prompt_tokens"] for t in turns) * 1.05)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face model folder with a chat template (default: the embedded "
                                    "SmolLM2-135M-Instruct, prepared on first use; with --base-url: the "
                                    "server's model)")
    ap.add_argument("--base-url", help="use this running server (e.g. http://127.0.0.1:8000) instead of "
                                       "starting one; start it with --enable-prompt-tokens-details for hit shares")
    ap.add_argument("--turns", type=int, help="turns of the session (default: until the prompt passes "
                                              "--past-context times the model's context)")
    ap.add_argument("--past-context", type=float, default=2.0,
                    help="without --turns: run until the prompt is this many times the context (default 2)")
    ap.add_argument("--user-tokens", type=int, default=300, help="tokens of each user message (default 300)")
    ap.add_argument("--reply-tokens", type=int, default=100, help="max_tokens of each reply (default 100)")
    ap.add_argument("--ignore-eos", action="store_true", help="every reply exactly --reply-tokens long")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--text", choices=["austen", "random"], default="austen",
                    help="user messages: passages of an Austen novel (default) or seeded random words")
    ap.add_argument("--book", default="emma", help="Austen novel for --text austen (default emma)")
    ap.add_argument("--system-prompt", action="append",
                    help="the system prompt ('' for none); twice with --sessions 2: one per session")
    ap.add_argument("--system-prompt-as-sink", action="store_true",
                    help="each request's sinks are its system turn: the server starts with --sink-tokens system")
    ap.add_argument("--sessions", type=int, choices=[1, 2], default=1,
                    help="2: two sessions at once on one server, each with its own system prompt pinned as its "
                         "sink (implies --system-prompt-as-sink)")
    ap.add_argument("--probe", help="after the last turn, ask each session this (default with the default "
                                    f"personas of --sessions 2: {NAME_PROBE!r})")
    ap.add_argument("--probe-unpinned", action="store_true",
                    help="ask --probe again with vllm_xargs sink_tokens=4 (the system prompt out of the window)")
    ap.add_argument("--sink-tokens", type=int, default=4, help="attention-sink tokens (default 4)")
    ap.add_argument("--sink-window", type=int, default=1024,
                    help="window tokens, a multiple of the KV block size (default 1024)")
    ap.add_argument("--max-model-len", type=int, help="the whole session's length limit (default: a power "
                                                      "of two above the session's tokens, at least 65536)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="skip torch.compile: the server starts faster and runs slower")
    ap.add_argument("--show-text", action="store_true", help="print each user message and reply")
    ap.add_argument("--out", help="folder for turns.json/.csv/.png and server.log "
                                  "(default ~/.cache/streaming-sink/chat)")
    ap.add_argument("--json", help="also write the per-turn records here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for the server to start")
    return ap


def per_request_sinks() -> bool:
    """Whether this streaming-sink takes ``--sink-tokens system`` (per-request sinks, issue 23)."""
    try:
        from streaming_sink import request_sinks  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = parser()
    args, serve_args = ap.parse_known_args()
    if args.base_url and serve_args:
        ap.error(f"unknown options {serve_args} (with --base-url nothing goes to `vllm serve`)")
    if args.sessions == 2:
        args.system_prompt_as_sink = True
    from streaming_sink_tools import prepare

    term = Terminal()
    out = Path(args.out or prepare.cache_dir() / "chat").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    base = args.base_url.rstrip("/") if args.base_url else None
    model = args.model
    if base and not model:
        model = requests.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    if not model:
        model = prepare.default_model_path()
    tok = None
    if Path(model).is_dir():
        model = str(Path(model).resolve()) if not base else model
        if args.model is None and not base:
            tok = prepare.load_tokenizer()
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model)
    elif not base:
        sys.exit(f"--model {model}: not a folder (the server runs offline)")
    tokens = Tokens(tok, base, model)
    ctx = model_context(model)

    # The sessions' system prompts (and the name each persona should answer the probe with).
    given = args.system_prompt or []
    if len(given) > args.sessions:
        ap.error(f"--system-prompt given {len(given)} times for {args.sessions} session(s)")
    if args.sessions == 2 and not given:
        systems, expected = [p for p, _ in PERSONAS], [n for _, n in PERSONAS]
        args.probe = args.probe or NAME_PROBE
    else:
        systems = given + [DEFAULT_SYSTEM] * (args.sessions - len(given))
        expected = [None] * args.sessions
    if args.sessions == 2 and len(set(systems)) == 1:
        ap.error("--sessions 2 needs two different system prompts (give --system-prompt twice)")
    if args.probe_unpinned and not args.probe:
        ap.error("--probe-unpinned needs --probe")

    system_mode = False
    if args.system_prompt_as_sink:
        if not all(systems):
            ap.error("--system-prompt-as-sink needs a system prompt")
        counts = []
        for system in systems:
            if tok is None:
                n = server_system_tokens(base, model, system)
                if n is None:
                    sys.exit("cannot count the system prompt's tokens: no local tokenizer and no /tokenize")
            else:
                n = system_turn_tokens(tok, system)
            counts.append(n)
        system_mode = per_request_sinks()
        if system_mode:
            for i, n in enumerate(counts):
                print(f"system prompt as the sink: session {'AB'[i]}'s system turn is {n} tokens: the server "
                      f"pins each request's own system turn (--sink-tokens system)"
                      + (" -- start the server with it" if base else ""))
        else:
            if len(set(counts)) > 1:
                sys.exit(f"this streaming-sink has one --sink-tokens per server, and the system turns are "
                         f"{counts} tokens: update it for per-request sinks (--sink-tokens system)")
            args.sink_tokens = counts[0]
            print(f"system prompt as the sink: the system turn is {counts[0]} tokens -> --sink-tokens {counts[0]}"
                  + ("" if not base else " (start the server with it; this script cannot change a running one)"))
        args.sink_counts = counts

    # The session's turns and its length (for max_model_len and the text to prepare).
    per_turn = args.user_tokens + args.reply_tokens + 12  # + the template's turn markers
    if args.turns:
        n_turns = args.turns
    else:
        if not ctx:
            ap.error("the model's context is unknown here: give --turns")
        n_turns = math.ceil((args.past_context * ctx) / per_turn) + 1
    session_tokens = n_turns * per_turn + 200
    if args.max_model_len is None:
        args.max_model_len = 1 << max(16, math.ceil(math.log2(session_tokens * 1.25)))

    print(f"model    {model}" + (f"  (context {ctx:,} tokens)" if ctx else ""))
    print(f"session  {args.sessions} x {n_turns} turns: user messages of ~{args.user_tokens} tokens "
          f"({'Austen, ' + args.book.title() if args.text == 'austen' else 'random words'}), replies of "
          f"{'exactly' if args.ignore_eos else 'at most'} {args.reply_tokens} tokens, temperature {args.temperature}"
          + (f"; ~{session_tokens:,} tokens = {session_tokens / ctx:.1f}x the context" if ctx else ""))
    texts = []
    for i in range(args.sessions):  # each session its own stretch of the book
        if args.text == "austen":
            texts.append(user_messages(prepare.corpus_text(args.book), tokens, args.user_tokens, n_turns,
                                       skip=i * n_turns))
        else:
            texts.append(random_messages(tokens, args.user_tokens, n_turns, seed=i))

    proc = None
    sessions = []
    try:
        if base is None:
            if system_mode:
                args.sink_tokens = "system"
            proc, base, log, _ = start_server(model, args, serve_args, out, term)
            started = wait_healthy(base, proc, log, term, args.timeout)
            pool, bs = kv_pool(base)
            print(f"server ready in {started:.0f} s; KV pool {pool} blocks of {bs} tokens; policy: "
                  + ("each request's system turn as its sinks" if system_mode else f"{args.sink_tokens} sink tokens")
                  + f" + {args.sink_window}-token window")
            tokens.base = base
        if args.system_prompt_as_sink and tok is not None:
            for system, n in zip(systems, args.sink_counts):
                m = server_system_tokens(base, model, system)
                if m is not None and m != n:
                    print(f"WARNING: the server counts the system turn as {m} tokens, not {n}")
        if args.sessions == 1:
            sessions = [run_session(base, model, systems[0], texts[0], args, term, ctx)]
        else:
            sessions = run_sessions(base, model, systems, texts, args, ctx)
        if args.probe:
            for i, (system, history) in enumerate(zip(systems, sessions)):
                ask_probe(base, model, history, args, "AB"[i] if args.sessions > 1 else "", expected[i], term)
    except KeyboardInterrupt:
        term.end_status()
        print("\ninterrupted")
        return
    finally:
        if proc is not None:
            stop(proc)
    summarize(sessions, systems, args, ctx, out, model, system_mode)


def run_session(base: str, model: str, system: str, user_texts: list[str], args, term: Terminal | None,
                ctx: int | None, label: str = "", lock: threading.Lock | None = None) -> dict:
    """One session, turn after turn; returns {"turns": per-turn records, "history": the messages}."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    turns = []
    if not label:
        print("-" * 100)
    for k, text in enumerate(user_texts, start=1):
        history.append({"role": "user", "content": text})

        def status(n_text: int, answering: bool, secs: float, k=k) -> None:
            term.status(f"turn {k}: " + (f"replying ({n_text} pieces, {secs:.1f} s)" if answering
                                         else f"waiting for the first token ({secs:.1f} s)"))

        if term:
            term.status(f"turn {k}: sent")
        r = chat_turn(base, model, history, args, on_event=status if term else None)
        if term:
            term.end_status()
        history.append({"role": "assistant", "content": r["reply"]})
        r["turn"] = k
        turns.append(r)
        with lock or contextlib.nullcontext():
            if args.show_text:
                print(f"  {label}user: {text[:300]}{'...' if len(text) > 300 else ''}")
                print(f"  {label}assistant: {r['reply']}")
            print((f"{label} " if label else "") + row(k, r, ctx), flush=True)
    if not label:
        print("-" * 100)
    return dict(turns=turns, history=history)


def run_sessions(base: str, model: str, systems: list[str], texts: list[list[str]], args, ctx) -> list[dict]:
    """Sessions at once, one thread each: their turns share the server's steps (one batch)."""
    lock = threading.Lock()
    results: list[dict | None] = [None] * len(systems)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = run_session(base, model, systems[i], texts[i], args, None, ctx, label="AB"[i], lock=lock)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    print("-" * 100)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(systems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("-" * 100)
    if errors:
        raise errors[0]
    return results


def ask_probe(base: str, model: str, session: dict, args, label: str, expected: str | None, term) -> None:
    """The --probe question after the session's last turn: pinned (the server's system mode), and
    with --probe-unpinned again with 4 sinks (vllm_xargs), where the system prompt has left the window."""
    messages = session["history"] + [{"role": "user", "content": args.probe}]
    tries = [("pinned", None)] + ([("4 sinks", {"sink_tokens": 4})] if args.probe_unpinned else [])
    session["probe"] = {"question": args.probe, "expected": expected}
    for name, xargs in tries:
        body = {"model": model, "messages": messages, "max_tokens": 30, "temperature": 0}
        if xargs:
            body["vllm_xargs"] = xargs
        term.status(f"session {label or 'A'}: asking {args.probe!r} ({name}"
                    + ("; another sink length: the whole history is prefilled again)" if xargs else ")"))
        r = requests.post(base + "/v1/chat/completions", json=body, timeout=3600)
        term.end_status()
        if r.status_code != 200:
            print(f"{label} probe ({name}): the server answered {r.status_code}: {r.text[:300]}")
            continue
        answer = (r.json()["choices"][0]["message"]["content"] or "").strip()
        hit = "" if expected is None else ("  [names " + expected + "]" if expected.lower() in answer.lower()
                                           else "  [does not name " + expected + "]")
        print(f"{label + ' ' if label else ''}probe ({name:>7}): {args.probe!r} -> {answer!r}{hit}")
        session["probe"][name] = answer


def summarize(sessions: list[dict], systems: list[str], args, ctx: int | None, out: Path, model: str,
              system_mode: bool) -> None:
    if not sessions or not sessions[0]["turns"]:
        return
    for i, sess in enumerate(sessions):
        turns = sess["turns"]
        label = f"[{'AB'[i]}] " if len(sessions) > 1 else ""
        last = turns[-1]
        total = last["prompt_tokens"] + last["completion_tokens"]
        later = turns[1:] or turns
        hits = [t["hit_share"] for t in later]
        ttft = sorted(t["ttft_s"] for t in later)
        print(f"{label}session  {len(turns)} turns, {total:,} tokens in the last request"
              + (f" = {total / ctx:.2f}x the {ctx:,}-token context" if ctx else ""))
        if all(t["cached_tokens"] is None for t in turns):
            print(f"{label}cache    the server reports no cached tokens: start it with --enable-prompt-tokens-details")
        else:
            print(f"{label}cache    turns 2-{len(turns)}: {100 * sum(hits) / len(hits):.0f}% of prompt tokens served "
                  f"from the prefix cache on average (lowest {100 * min(hits):.0f}%)")
        print(f"{label}TTFT     turn 1 {turns[0]['ttft_s']:.2f} s; turns 2-{len(turns)}: median "
              f"{ttft[len(ttft) // 2]:.2f} s, max {ttft[-1]:.2f} s; last turn {last['ttft_s']:.2f} s")
    started = not args.base_url  # with --base-url the server's own policy flags are unknown here
    turns = sessions[0]["turns"]
    settings = dict(model=model, context=ctx, sink_tokens=args.sink_tokens if started else None,
                    sink_window=args.sink_window if started else None,
                    user_tokens=args.user_tokens, reply_tokens=args.reply_tokens, text=args.text,
                    system_prompt=systems[0], system_prompt_as_sink=args.system_prompt_as_sink,
                    per_request_sinks=system_mode, sessions=args.sessions,
                    temperature=args.temperature, ignore_eos=args.ignore_eos, base_url=args.base_url)
    strip = lambda ts: [{k: v for k, v in t.items() if k != "reply"} for t in ts]  # noqa: E731
    records = strip(turns)
    doc = dict(settings=settings, turns=records,
               sessions=[dict(system_prompt=systems[i], system_turn_tokens=(getattr(args, "sink_counts", None)
                                                                            or [None] * len(sessions))[i],
                              turns=strip(s["turns"]), probe=s.get("probe")) for i, s in enumerate(sessions)])
    (out / "turns.json").write_text(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    with open(out / "turns.csv", "w") as f:
        f.write("session,turn,prompt_tokens,cached_tokens,hit_share,ttft_s,completion_tokens,total_s\n")
        for i, s in enumerate(sessions):
            for t in strip(s["turns"]):
                f.write(f"{'AB'[i]},{t['turn']},{t['prompt_tokens']},"
                        f"{t['cached_tokens'] if t['cached_tokens'] is not None else ''},"
                        f"{t['hit_share']:.4f},{t['ttft_s']:.4f},{t['completion_tokens']},{t['total_s']:.4f}\n")
    last = turns[-1]
    total = last["prompt_tokens"] + last["completion_tokens"]
    png = out / "turns.png"
    plot(turns, png, f"{len(turns)}-turn chat, {total:,} tokens"
                     + (f" ({total / ctx:.1f}x the context)" if ctx else "")
                     + (f"\nserver {args.base_url}" if args.base_url
                        else f"\nstreaming-sink S={args.sink_tokens}, W={args.sink_window}")
                     + (" (session A)" if len(sessions) > 1 else ""))
    print(f"written  {out / 'turns.json'}, {out / 'turns.csv'}, {png}"
          + ("" if args.base_url else f", {out / 'server.log'}"))


if __name__ == "__main__":
    main()
