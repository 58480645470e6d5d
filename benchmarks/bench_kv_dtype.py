"""fp8 vs bf16 KV cache under --kv-policy streaming-sink (vLLM CPU): decode speed and KV blocks.

Both engines (same model, same policy, ``--kv-cache-dtype auto`` = the model's bf16 vs each fp8
dtype asked for) stay up in one process; their runs alternate (A, B, A, B, ...) so machine
noise hits both alike. Each run decodes ``--new`` tokens for a batch of ``--batch`` random
prompts of ``--prompt`` tokens, past the window (every decode row is a streaming row: the
core's C++ kernel reading the cache, fp8 widened in the kernel). Reported per engine:
blocks in vLLM's KV pool (same ``VLLM_CPU_KVCACHE_SPACE``: an fp8 block is half a bf16 one),
peak live blocks per request (the policy's bound: the same for both), decode tokens per wall
second and per process CPU-second (medians of ``--repeats``), and the ratio to bf16.

    .venv/bin/python benchmarks/bench_kv_dtype.py                       # SmolLM2-135M bf16, fp8_e4m3
    .venv/bin/python benchmarks/bench_kv_dtype.py --kv fp8_e4m3,fp8_e5m2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

for k, v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                 DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1", VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(k, v)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import vllm_sink  # noqa: E402,F401  (LLM(kv_policy=...) keywords)
from vllm import LLM, SamplingParams  # noqa: E402


def live_blocks(llm: LLM) -> list[int]:
    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    return [sum(not b.is_null for b in blocks)
            for m in kv.coordinator.single_type_managers for blocks in m.req_to_blocks.values()]


def run(llm: LLM, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    """One batch: prefill, then decode timed (wall and this process's CPU time)."""
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(seed)
    for i in range(batch):
        ids = torch.randint(3, 40000, (prompt_len,), generator=g).tolist()
        engine.add_request(f"r{seed}-{i}", {"prompt_token_ids": ids},
                           SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    produced: dict[str, int] = {}
    while len(produced) < batch:  # prefill (chunks) up to each request's first token: not timed
        produced.update({o.request_id: len(o.outputs[0].token_ids) for o in engine.step()
                         if o.outputs and o.outputs[0].token_ids})
    # early requests decode while later ones prefill: only what is left is timed
    peak, tokens = 0, batch * new_tokens - sum(produced.values())
    wall, cpu = time.perf_counter(), time.process_time()
    while engine.has_unfinished_requests():
        engine.step()
        peak = max([peak, *live_blocks(llm)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(tok_s=tokens / wall, tok_cpu_s=tokens / cpu, peak=peak, tokens=tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: the prepared SmolLM2-135M-Instruct bf16 folder)")
    ap.add_argument("--kv", default="fp8_e4m3", help="fp8 cache dtypes to compare with auto (comma-separated)")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens (past S + W: decode rows stream)")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens per request per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1)")
    ap.add_argument("--json", help="write the runs and the table here")
    args = ap.parse_args()
    if args.model is None:
        from streaming_sink_tools.prepare import default_model_path

        args.model = str(default_model_path(prepare=True, dtype="bfloat16"))
    kinds = ["auto", *[k for k in args.kv.split(",") if k]]
    engines = {}
    for kind in kinds:
        engines[kind] = LLM(model=args.model, dtype="bfloat16", block_size=args.block_size, seed=0,
                            kv_policy="streaming-sink", sink_tokens=args.sink_tokens, sink_window=args.window,
                            max_model_len=args.prompt + args.new + 64, max_num_batched_tokens=1024,
                            max_num_seqs=args.batch, enable_prefix_caching=False, enforce_eager=True,
                            kv_cache_dtype=kind)
    torch._C.set_num_threads(args.threads)  # vLLM's CPU worker makes torch.set_num_threads a no-op
    runs = {k: [] for k in kinds}
    for rep in range(args.repeats):  # interleaved: auto, fp8, auto, fp8, ...
        for kind in kinds:
            runs[kind].append(run(engines[kind], args.batch, args.prompt, args.new, seed=100 + rep))
            print(f"repeat {rep} {kind:<9} {runs[kind][-1]}", file=sys.stderr, flush=True)
    base = {m: statistics.median(r[m] for r in runs["auto"]) for m in ("tok_s", "tok_cpu_s")}
    rows = []
    print(f"\n{args.model}: S={args.sink_tokens} W={args.window} block {args.block_size}, batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} decoded per request, medians of {args.repeats} (interleaved)")
    print(f"{'kv-cache-dtype':<16}{'pool blocks':>12}{'peak live/req':>15}{'tok/s':>9}{'tok/CPU-s':>11}"
          f"{'wall ratio':>12}{'CPU-s ratio':>13}")
    for kind in kinds:
        med = {m: statistics.median(r[m] for r in runs[kind]) for m in ("tok_s", "tok_cpu_s")}
        row = dict(kv_cache_dtype=kind, pool_blocks=engines[kind].llm_engine.vllm_config.cache_config.num_gpu_blocks,
                   peak_live=max(r["peak"] for r in runs[kind]), **med,
                   wall_ratio=med["tok_s"] / base["tok_s"], cpu_ratio=med["tok_cpu_s"] / base["tok_cpu_s"])
        rows.append(row)
        print(f"{kind + (' (bf16)' if kind == 'auto' else ''):<16}{row['pool_blocks']:>12}{row['peak_live']:>15}"
              f"{row['tok_s']:>9.1f}{row['tok_cpu_s']:>11.1f}{row['wall_ratio']:>12.2f}{row['cpu_ratio']:>13.2f}")
    print(f"load average {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), runs=runs, rows=rows, load=os.getloadavg()), f, indent=1)


if __name__ == "__main__":
    main()
