"""Stream one completion past the model's context window through a real vLLM server.

Starts ``python -m vllm.entrypoints.openai.api_server --kv-policy streaming-sink``
on the embedded SmolLM2-135M-Instruct (8192-token context; prepared offline
from a PyPI wheel), sends a prompt longer than the whole context (Austen's
*Emma*), streams the continuation to the terminal and prints what the KV cache
held meanwhile. On a CUDA install ``vllm serve MODEL --kv-policy streaming-sink``
is the same server.

    .venv/bin/python examples/stream_past_context.py [--model PATH] [--prompt-tokens 9000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import re
import socket
import subprocess
import sys
import threading
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, log_path: str, timeout: float = 900) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {log_path}:\n" + open(log_path).read()[-3000:])
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                print(f"\rserver ready in {time.time() - start:.0f} s" + " " * 20)
                return
        except requests.ConnectionError:
            pass
        print(f"\rstarting vLLM server ... {time.time() - start:.0f} s", end="", flush=True)
        time.sleep(1)
    sys.exit(f"server not healthy after {timeout:.0f} s; see {log_path}")


def kv_usage(base: str) -> float:
    text = requests.get(base + "/metrics", timeout=5).text
    m = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.eE+-]+)", text, re.M)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: the embedded SmolLM2, prepared on first use)")
    ap.add_argument("--prompt-tokens", type=int, default=9000, help="prompt length (default 9000 > 8192)")
    ap.add_argument("--max-tokens", type=int, default=200, help="tokens to stream back")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--sink-window", type=int, default=1024, help="window tokens (multiple of the block size)")
    ap.add_argument("--max-model-len", type=int, default=65536)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="skip torch.compile: the server starts in seconds instead of minutes on CPU")
    args = ap.parse_args()

    from streaming_sink import prepare

    model = args.model or prepare.default_model_path()
    tok = prepare.load_tokenizer() if not args.model else None
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    text = prepare.corpus_text("emma")
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    ctx = json.load(open(os.path.join(model, "config.json"))).get("max_position_embeddings")
    print(f"model {model}\ncontext window {ctx} tokens; prompt {len(ids)} tokens of Emma + {args.max_tokens} streamed")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = os.path.join(prepare.cache_dir(), "demo-server.log")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(args.max_model_len),
           "--kv-policy", "streaming-sink", "--sink-tokens", str(args.sink_tokens),
           "--sink-window", str(args.sink_window)] + (["--enforce-eager"] if args.enforce_eager else [])
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2", **os.environ}
    print("$ " + " ".join(cmd[1:]))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # one group: cleanup reaches vLLM's workers
    try:
        wait_healthy(base, proc, log_path)
        peak = [0.0]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                try:
                    peak[0] = max(peak[0], kv_usage(base))
                except requests.RequestException:
                    pass

        threading.Thread(target=watch, daemon=True).start()
        # No per-request "seed": vllm-cpu 0.32.0's sampler fails on it ("CPU Generator
        # does not use offset"), with or without this plugin.
        body = {"model": model, "prompt": ids, "max_tokens": args.max_tokens, "temperature": 0.7,
                "top_p": 0.95, "stream": True, "stream_options": {"include_usage": True}}
        start, first, usage = time.time(), None, None
        print(f"prefilling {len(ids)} tokens in chunks through the sink+window cache ...")
        print("-" * 72)
        with requests.post(base + "/v1/completions", json=body, stream=True, timeout=3600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        first = first or time.time()
                        print(choice["text"], end="", flush=True)
        done.set()
        end = time.time()
        print("\n" + "-" * 72)
        if usage is None or first is None:
            sys.exit(f"the stream ended without a completion; see {log_path}")
        total = usage["prompt_tokens"] + usage["completion_tokens"]
        print(f"stream: {total} tokens ({total / ctx:.2f}x the {ctx}-token context), "
              f"first token after {first - start:.1f} s, "
              f"{usage['completion_tokens'] / max(end - first, 1e-9):.1f} tokens/s after that")
        print(f"peak KV cache use during the stream: {100 * peak[0]:.2f}% of the pool "
              f"(sinks + a {args.sink_window}-token window; stock vLLM would need {total} tokens of KV "
              f"and refuses prompts past {ctx})")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
