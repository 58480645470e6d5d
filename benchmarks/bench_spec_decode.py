"""n-gram speculative decoding with --kv-policy streaming-sink: decode speed on a document with repeats.

One greedy stream whose prompt is a passage of Austen's *Emma* (the prepared corpus,
streaming_sink_tools/prepare.py) written out ``--copies`` times: its continuation copies the
passage again, which is what n-gram drafting (prompt lookup) feeds on, like a model quoting or
editing a long document. Four engines, one process, created once; the runs alternate (A B C D,
``--repeats`` times, same prompt) and each figure is the median:

| engine | what |
|---|---|
| policy+ngram | ``--kv-policy streaming-sink`` (S, W) with ``--speculative-config`` ngram: past the window |
| policy | the same policy without speculation |
| stock+ngram | stock vLLM with the same speculation, below the model's context (the stream fits it) |
| stock | stock vLLM, below the context |

With the defaults (SmolLM2-135M fp32, block 128, S=4, W=1024: dense up to 1280 tokens; a
2048-token prompt, 256 new tokens) every policy decode step is past the window, and every
stock one inside SmolLM2's 8192-token context. Decode is timed from the step after the
first token to the end (prefill excluded): tokens per process CPU-second
(``time.process_time()`` around the engine steps, steady on the loaded 2-core machines) next
to wall tokens/s. Also printed: vLLM's per-request acceptance (accepted / drafted, mean
acceptance length), the most KV blocks the request held while decoding, and whether each
engine's greedy tokens equal those of its twin without speculation (they must).

Threads: ``OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind NUMBA_NUM_THREADS=1`` unless set
(without the last, vLLM's n-gram proposer's numba threads spin against torch's on a few cores:
n-gram decode ran 10-40x slower here, stock and policy alike). Each engine runs in its own
process (vLLM 0.32 cannot build a second engine in a process whose n-gram drafter imported
numba), ``VLLM_CPU_KVCACHE_SPACE=1`` GiB each; prefix caching on (repeats skip the prefill).

    .venv/bin/python benchmarks/bench_spec_decode.py
    .venv/bin/python benchmarks/bench_spec_decode.py --tiny --repeats 1   # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Before torch / vLLM are imported: their thread pools read these once.
# NUMBA_NUM_THREADS=1: vLLM's n-gram proposer runs numba, whose own thread pool otherwise spins
# against torch's on a few cores (each op of a step then waits a time slice: ~10-40x slower).
for k, v in dict(OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1",
                 NUMBA_NUM_THREADS="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                 DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1", VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(k, v)

import vllm  # noqa: E402
import vllm_sink  # noqa: E402,F401  (adds kv_policy / sink_tokens / sink_window to LLM)
from vllm import LLM, SamplingParams  # noqa: E402

from flag_tax_common import ROOT, tiny_model  # noqa: E402

ENGINES = ("policy+ngram", "policy", "stock+ngram", "stock")


def document(n_tokens: int, copies: int, tiny: bool) -> list[int]:
    """A passage written out ``copies`` times (``n_tokens`` in all)."""
    per = n_tokens // copies
    if tiny:  # the tiny model's vocabulary: seeded ids
        import torch

        g = torch.Generator().manual_seed(7)
        passage = torch.randint(3, 384, (per,), generator=g).tolist()
    else:
        from streaming_sink_tools.prepare import corpus_tokens

        passage = [int(t) for t in corpus_tokens("emma")[1000:1000 + per]]
    return (passage * copies)[:n_tokens]


def make_engine(args, model: str, name: str) -> LLM:
    spec = dict(method="ngram", num_speculative_tokens=args.k, prompt_lookup_max=args.lookup_max,
                prompt_lookup_min=args.lookup_min)
    common = dict(model=model, dtype=args.dtype, block_size=args.block, max_num_seqs=4,
                  max_num_batched_tokens=args.chunk, enable_prefix_caching=True, seed=0,
                  max_model_len=args.prompt + args.new + 64)
    policy = dict(kv_policy="streaming-sink", sink_tokens=args.sink_tokens, sink_window=args.window)
    extra = {**(policy if name.startswith("policy") else {}),
             **(dict(speculative_config=spec, per_request_spec_decode_metrics="summary")
                if name.endswith("+ngram") else {})}
    return LLM(**common, **extra)


class Worker:
    """One engine in its own process: vLLM 0.32 cannot build a second engine in a process
    whose n-gram drafter imported numba (its Triton-override scan trips on llvmlite), and
    process CPU time is then each engine's own. Commands on stdin, JSON results on stdout."""

    def __init__(self, name: str, argv: list[str]) -> None:
        import subprocess

        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, *argv, "--worker", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError(f"worker {self.name} exited ({self.proc.wait()})")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve(args, model: str, name: str) -> None:
    """The worker's loop: build the engine, then one run per command line."""
    results = os.fdopen(os.dup(1), "w")  # the pipe to the parent: results only
    os.dup2(2, 1)  # vLLM's log lines go to stderr (a full pipe would stall the engine)
    sys.stdin.readline()  # the parent's first command: start now
    t0 = time.perf_counter()
    llm = make_engine(args, model, name)
    run(llm, list(range(3, 35)) * 4, 64, "warm-up")  # numba compiles the n-gram proposer on first use
    print("RESULT " + json.dumps({"startup_s": time.perf_counter() - t0}), file=results, flush=True)
    for line in sys.stdin:
        c = json.loads(line)
        print("RESULT " + json.dumps(run(llm, c["prompt"], c["new"], c["tag"])), file=results, flush=True)


def run(llm: LLM, prompt: list[int], new: int, tag: str) -> dict:
    engine = llm.llm_engine
    engine.add_request(tag, {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    managers = engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator.single_type_managers
    wall = cpu = 0.0
    first, last, peak = None, None, 0
    while engine.has_unfinished_requests():
        w0, c0 = time.perf_counter(), time.process_time()
        outs = engine.step()
        if first is not None:  # decode: the steps after the one that gave the first token
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            peak = max(peak, sum(sum(not b.is_null for blocks in m.req_to_blocks.values() for b in blocks)
                                 for m in managers))  # the one request running
        for o in outs:
            last = o
            if first is None and o.outputs[0].token_ids:
                first = len(o.outputs[0].token_ids)
    tokens = list(last.outputs[0].token_ids)
    assert len(tokens) == new, (tag, len(tokens))
    m = last.outputs[0].spec_decode_metrics
    return dict(decode_tokens=new - first, wall=wall, cpu=cpu, peak_blocks=peak, tokens=tokens,
                spec=None if m is None else m.to_dict(), load_avg=os.getloadavg()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny random Llama (CI-sized)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block", type=int)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int)
    p.add_argument("--prompt", type=int, help="prompt tokens (the document)")
    p.add_argument("--copies", type=int, default=2, help="times the passage is written out in the prompt")
    p.add_argument("--new", type=int, help="new tokens per run")
    p.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens (the prefill chunk)")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-max", type=int, default=4)
    p.add_argument("--lookup-min", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write settings, table and raw runs here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one engine (Worker)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    size = dict(block=32, window=128, prompt=512, new=256) if args.tiny else \
        dict(block=128, window=1024, prompt=2048, new=256)
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model_path:  # a worker: the parent's model folder
        model = args.model_path
    elif args.tiny:
        model = tiny_model()
    else:
        from streaming_sink_tools.prepare import default_model_path

        model = default_model_path(dtype=args.dtype)
    if args.worker:
        return serve(args, model, args.worker)
    prompt = document(args.prompt, args.copies, args.tiny)
    load0 = os.getloadavg()[0]
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if v is not None and k not in ("json", "worker", "tiny", "repeats")]
    engines, startup = {}, {}
    for name in ENGINES:  # one at a time: startups do not compete
        engines[name] = Worker(name, settings + ["--tiny"] * args.tiny + [f"--model-path={model}"])
        startup[name] = engines[name].ask({})["startup_s"]
        print(f"== {name}: up in {startup[name]:.0f} s", flush=True)

    raw: dict[str, list[dict]] = {name: [] for name in ENGINES}
    t0 = time.perf_counter()
    for rep in range(args.repeats):  # A B C D, A B C D, ...
        for name in ENGINES:
            raw[name].append(engines[name].ask({"prompt": prompt, "new": args.new, "tag": f"{name}-{rep}"}))
            r = raw[name][-1]
            print(f"  rep {rep} {name:13s} {r['decode_tokens'] / r['cpu']:7.1f} tok/CPU-s "
                  f"{r['decode_tokens'] / r['wall']:7.1f} tok/s  load {r['load_avg']:.1f}", flush=True)
    runs_s = time.perf_counter() - t0
    for worker in engines.values():
        worker.close()

    def med(name, f):
        return statistics.median(f(r) for r in raw[name])

    table = {}
    for name in ENGINES:
        rs = raw[name]
        table[name] = dict(tok_per_cpu_s=med(name, lambda r: r["decode_tokens"] / r["cpu"]),
                           tok_per_s=med(name, lambda r: r["decode_tokens"] / r["wall"]),
                           peak_blocks=max(r["peak_blocks"] for r in rs), spec=rs[0]["spec"])
    twin = {"policy+ngram": "policy", "stock+ngram": "stock"}
    print(f"\nn-gram speculation (k={args.k}, lookup {args.lookup_min}-{args.lookup_max}): "
          f"{os.path.basename(model.rstrip('/'))} {args.dtype}, block {args.block}, S={args.sink_tokens}, "
          f"W={args.window}; prompt {args.prompt} tokens ({args.copies} copies of a passage), {args.new} new; "
          f"vLLM {vllm.__version__}; median of {args.repeats}; load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"runs {runs_s:.0f} s\n")
    print("| engine | decode tok/CPU-s | decode tok/s | vs policy (CPU-s / wall) | accepted / drafted | "
          "mean acceptance length | decode blocks/req | greedy tokens == twin |")
    print("|---|---|---|---|---|---|---|---|")
    base = table["policy"]
    for name in ENGINES:
        e, s = table[name], table[name]["spec"]
        acc = "-" if s is None else f"{s['num_accepted_draft_tokens']}/{s['num_draft_tokens']} " \
                                    f"({s['draft_acceptance_rate']:.2f})"
        mal = "-" if s is None else f"{s['mean_acceptance_length']:.2f}"
        same = "-" if name not in twin else str(raw[name][0]["tokens"] == raw[twin[name]][0]["tokens"])
        print(f"| {name} | {e['tok_per_cpu_s']:.1f} | {e['tok_per_s']:.1f} | "
              f"{e['tok_per_cpu_s'] / base['tok_per_cpu_s']:.2f} / {e['tok_per_s'] / base['tok_per_s']:.2f} | "
              f"{acc} | {mal} | {e['peak_blocks']} | {same} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=vars(args), model=model, vllm=vllm.__version__, table=table, startup_s=startup,
                           raw={k: [{**r, "tokens": None} for r in v] for k, v in raw.items()}), f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
