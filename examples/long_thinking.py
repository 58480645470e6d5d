"""A chat answer that runs many times past the model's context, at bounded KV.

Starts ``vllm serve MODEL --kv-policy streaming-sink`` (the stock CLI; our plugin adds the
flag), sends one chat request with ``max_tokens`` a multiple of the model's context, and
streams the answer back. A live line shows the tokens streamed so far and the KV blocks the
request holds (from vLLM's per-step log, or its /metrics gauge on a large pool), next to what
stock vLLM would need and where it stops.

With a model whose chat template has a thinking mode (``<think> ... </think>``, e.g. Qwen3),
thinking is switched on and the stream is shown in two parts: the thinking, then the answer
after ``</think>`` (or vLLM's ``reasoning`` deltas when the server runs a reasoning parser,
``--reasoning-parser qwen3``). The embedded default, SmolLM2-135M-Instruct, has no thinking
mode: it just writes one long answer.

    .venv/bin/python examples/long_thinking.py                        # SmolLM2, 3x its 8192 context
    .venv/bin/python examples/long_thinking.py --model PATH/Qwen3-0.6B --context-multiple 4
    .venv/bin/python examples/long_thinking.py --model PATH --ignore-eos  # never stop early

Options this script does not know (``--dtype``, ``--block-size``, ``--reasoning-parser``, ...)
go to ``vllm serve``. Generation is one token per step: on 2 CPU cores SmolLM2 streams tens of
tokens per second, so a 3x stream (~25k tokens) takes a while; ``--context-multiple 1.5``
is a quicker look. The helpers (server log, live line, KV pool) are stream_past_context.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_past_context import (ServerLog, Terminal, blocks_line, free_port, kv_pool,  # noqa: E402
                                 kv_usage, stop, vllm_command, wait_healthy)

QUESTION = ("Think step by step, at length, about how a library could be organised so that a "
            "reader can always find any book, then write the full catalogue rules, with examples.")
THINK_END = "</think>"


def has_thinking(tok) -> bool:
    template = getattr(tok, "chat_template", None) or ""
    return isinstance(template, str) and ("<think>" in template or "enable_thinking" in template)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model folder with a chat template (default: the embedded "
                                    "SmolLM2-135M-Instruct)")
    ap.add_argument("--context-multiple", type=float, default=3.0,
                    help="max_tokens as a multiple of the model's context (default 3)")
    ap.add_argument("--max-tokens", type=int, help="tokens to generate (overrides --context-multiple)")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--sink-window", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--ignore-eos", action="store_true", help="generate all max_tokens (no early stop)")
    ap.add_argument("--no-thinking", action="store_true", help="thinking off even if the template has it")
    ap.add_argument("--out", help="folder for the text and server log (default: the demo cache folder)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for the server to start")
    args, serve_args = ap.parse_known_args()

    from streaming_sink_tools import prepare

    if args.model:
        from transformers import AutoTokenizer

        model = str(Path(args.model).expanduser().resolve())
        tok = AutoTokenizer.from_pretrained(model)
    else:
        model = prepare.default_model_path()
        tok = prepare.load_tokenizer()
    config = json.load(open(os.path.join(model, "config.json")))
    ctx = int(config.get("max_position_embeddings") or config.get("text_config", {})["max_position_embeddings"])
    max_tokens = args.max_tokens or int(args.context_multiple * ctx)
    thinking = has_thinking(tok) and not args.no_thinking
    out = Path(args.out or prepare.cache_dir() / "long-thinking").expanduser()
    out.mkdir(parents=True, exist_ok=True)

    term = Terminal()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = ServerLog(out / "server.log")
    max_model_len = 1 << max(16, math.ceil(math.log2(max_tokens + 4096)))
    cmd = vllm_command() + [
        "serve", model, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
        "--kv-policy", "streaming-sink", "--sink-tokens", str(args.sink_tokens),
        "--sink-window", str(args.sink_window), "--enable-logging-iteration-details",
        "--shutdown-timeout", "10"] + serve_args
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    print(f"model    {model}  (context {ctx:,} tokens; thinking mode: "
          f"{'on' if thinking else 'none in its chat template' if not has_thinking(tok) else 'off'})")
    print(f"request  one chat answer of up to {max_tokens:,} tokens = {max_tokens / ctx:.1f}x the context")
    print("$ " + " ".join(["vllm"] + cmd[1:]))
    with open(log.path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        started = wait_healthy(base, proc, log, term, args.timeout)
        pool, bs = kv_pool(base)
        print(f"server ready in {started:.0f} s; KV pool {pool} blocks of {bs} tokens")
        chat(base, model, args, max_tokens, thinking, log, term, pool, bs, ctx, out)
    except KeyboardInterrupt:
        term.end_status()
        print("\ninterrupted")
    finally:
        stop(proc)


def chat(base, model, args, max_tokens, thinking, log, term, pool, bs, ctx, out) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": args.question}],
            "max_tokens": max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "ignore_eos": args.ignore_eos, "stream": True,
            # usage on every chunk: the live count is tokens (a chunk may carry several: the
            # detokenizer holds back incomplete UTF-8), not chunks
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if thinking:
        body["chat_template_kwargs"] = {"enable_thinking": True}
    log.start_counting()
    state = {"n": 0, "part": "thinking" if thinking else "answer", "peak": 0}
    parts = {"thinking": [], "answer": []}
    per_step = pool <= 500  # the log's KV use (one decimal) is exact to a block on a small pool
    sampled: list[int] = []
    done = threading.Event()

    def held() -> int:
        if sampled and not per_step:
            return sampled[-1]
        return round(log.points[-1][1] / 100 * pool) if log.points else 0

    def status() -> str:
        blocks = held()
        state["peak"] = max(state["peak"], blocks)
        return f"[{state['part']} {state['n']:,}/{max_tokens:,}] " + blocks_line(
            log.tokens, blocks, bs, ctx, term.columns < 96)

    def watch() -> None:
        while not done.wait(0.5):
            log.poll()
            if not per_step:
                with contextlib.suppress(requests.RequestException):
                    if (used := kv_usage(base)) > 0:
                        sampled.append(round(used * pool))
            term.status(status())

    def show(part: str, text: str) -> None:
        if part != state["part"] or not (parts["thinking"] or parts["answer"]):
            term.text("", flush=True)
            term.text(f"--- {part} ---\n")
            state["part"] = part
        parts[part].append(text)
        term.text(text)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    usage, finish, pending = None, None, ""
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=7200) as r:
        if r.status_code != 200:
            done.set()
            term.end_status()
            sys.exit(f"the server answered {r.status_code}: {r.text[:1000]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if usage:
                state["n"] = usage["completion_tokens"]
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
                delta = choice.get("delta", {})
                reasoning = delta.get("reasoning") or delta.get("reasoning_content")
                if reasoning:  # the server's reasoning parser split it already
                    show("thinking", reasoning)
                if not delta.get("content"):
                    continue
                text = delta["content"]
                if state["part"] == "thinking" and thinking:  # split at </think> ourselves
                    pending += text
                    if THINK_END in pending:
                        before, after = pending.split(THINK_END, 1)
                        show("thinking", before)
                        show("answer", after)
                        pending = ""
                    elif len(pending) > len(THINK_END):
                        show("thinking", pending[:-len(THINK_END)])
                        pending = pending[-len(THINK_END):]
                else:
                    show("answer", text)
    if pending:
        show(state["part"], pending)
    done.set()
    watcher.join()
    time.sleep(0.5)
    log.poll()
    term.text("", flush=True)
    term.status(status(), force=True)
    term.end_status()
    if usage is None:
        sys.exit(f"the stream ended without usage; see {log.path}")
    gen, prompt = usage["completion_tokens"], usage["prompt_tokens"]
    thinking_chars, answer_chars = len("".join(parts["thinking"])), len("".join(parts["answer"]))
    print(f"streamed {gen:,} tokens ({(gen + prompt) / ctx:.2f}x the {ctx:,}-token context with the "
          f"{prompt}-token prompt), finish reason {finish!r}; thinking {thinking_chars:,} chars, "
          f"answer {answer_chars:,} chars")
    print(f"KV       at most {state['peak']} blocks held ({state['peak'] * bs:,} tokens of KV); stock vLLM "
          f"would need {math.ceil((gen + prompt) / bs)} blocks and stops at {ctx:,} tokens")
    (out / "thinking.txt").write_text("".join(parts["thinking"]))
    (out / "answer.txt").write_text("".join(parts["answer"]))
    print(f"text     {out / 'thinking.txt'}, {out / 'answer.txt'}; server log {log.path}")


if __name__ == "__main__":
    main()
