"""Decode tokens/s and live KV blocks per request: --kv-policy streaming-sink vs stock vLLM.

Same process, same model, same requests; both engines stay up and their runs
alternate (A, B, A, B, ...) so machine noise hits both alike. Stream lengths are
1x, 4x and 16x the window; stock vLLM runs each one that fits its max_model_len
(the model's context) and is marked "n/a" past it. Live blocks are read from the engine's own KV manager
at the end of each stream. Prints a table (medians of --repeats runs).

    .venv/bin/python benchmarks/bench_vllm_decode.py                    # tiny random Llama, 4096 context
    .venv/bin/python benchmarks/bench_vllm_decode.py --model PATH --window 1024 --block-size 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                 DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1", VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import vllm_sink  # noqa: E402,F401
from vllm import LLM, SamplingParams  # noqa: E402


def live_blocks(llm: LLM) -> list[int]:
    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    return [sum(not b.is_null for b in blocks)
            for m in kv.coordinator.single_type_managers for blocks in m.req_to_blocks.values()]


def run(llm: LLM, batch: int, prompt_len: int, new_tokens: int, seed: int) -> tuple[float, int]:
    """Decode tokens/s over the whole batch (prefill excluded) and the peak live blocks per request."""
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(seed)
    for i in range(batch):
        ids = torch.randint(3, 300, (prompt_len,), generator=g).tolist()
        engine.add_request(f"b{seed}-{i}", {"prompt_token_ids": ids},
                           SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    engine.step()  # prefill (prompt fits one chunk)
    peak, steps, start = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        peak = max([peak, *live_blocks(llm)])
    return batch * steps / (time.perf_counter() - start), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: a tiny random Llama with a 4096-token context)")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = args.model
    if model is None:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny_models import build_tiny_llama

        model = build_tiny_llama(os.path.join(tempfile.mkdtemp(), "tiny4k"), max_position_embeddings=4096)
    import json

    context = json.load(open(os.path.join(model, "config.json")))["max_position_embeddings"]
    prompt_len = 16
    lengths = [m * args.window for m in (1, 4, 16)]
    common = dict(model=model, block_size=args.block_size, dtype="float32", seed=0,
                  max_num_batched_tokens=max(256, args.batch * prompt_len))
    engines = {
        "streaming-sink": LLM(**common, max_model_len=max(lengths) + prompt_len, kv_policy="streaming-sink",
                              sink_tokens=args.sink_tokens, sink_window=args.window),
        "stock vLLM": LLM(**common, max_model_len=context),
    }
    results = {(name, n): [] for name in engines for n in lengths}
    with tqdm(total=len(lengths) * args.repeats * len(engines), desc="decode runs") as bar:
        for n in lengths:
            for r in range(args.repeats):
                for name, llm in engines.items():
                    if prompt_len + n <= llm.llm_engine.vllm_config.model_config.max_model_len:
                        results[name, n].append(run(llm, args.batch, prompt_len, n, seed=r))
                    bar.update()
    rows = [(name, n, statistics.median(r[0] for r in runs) if runs else None,
             max(r[1] for r in runs) if runs else None) for (name, n), runs in results.items()]
    print(f"\nmodel {model} (context {context}); window {args.window}, sinks {args.sink_tokens}, "
          f"block {args.block_size}, batch {args.batch}, median of {args.repeats}")
    print(f"{'engine':<16}{'stream':>8}{'x window':>10}{'decode tok/s':>15}{'live blocks/req':>17}")
    for name, n, tps, blocks in rows:
        if tps is None:
            print(f"{name:<16}{n:>8}{n // args.window:>10}{'n/a: past max_model_len ' + str(context):>32}")
        else:
            print(f"{name:<16}{n:>8}{n // args.window:>10}{tps:>15.1f}{blocks:>17}")
    ours = {n: t for e, n, t, _ in rows if e == "streaming-sink"}
    stock = {n: t for e, n, t, _ in rows if e == "stock vLLM" and t}
    for n, t in stock.items():
        print(f"speed ratio streaming-sink / stock at {n} tokens: {ours[n] / t:.2f}")


if __name__ == "__main__":
    main()
