"""The flag tax on SGLang: what ``kv_policy="streaming-sink"`` costs next to stock SGLang.

The SGLang twin of benchmarks/bench_flag_tax.py (same table idea and output), run in
``.venv-sglang``. Every engine is ``sglang.Engine(..., device="cpu",
attention_backend="torch_native")`` in this one process (each with its own scheduler and
detokenizer subprocesses), started once and kept up for the whole run; within a case the runs
alternate A B A B ... so machine noise hits both alike. Stock = this package installed but
``kv_policy`` left at "none", which is exactly stock SGLang (tests/sglang/test_sglang_stock.py).
Every figure is the median of ``--repeats`` runs and comes twice: tokens per CPU-second and wall
tokens/s, with policy / stock ratios of both.

| case | A (policy on) | B | what |
|---|---|---|---|
| 1 | W=2048 | stock | decode, batch 1, 200-token prompts, 256 new (dense regime: same outputs) |
| 2 | W=2048 | stock | the same, batch 8 |
| 3 | W=2048 | stock | prefill of 8 x 200-token prompts (max_new_tokens 1; the whole call is timed) |
| 4 | W=1024 | stock | batch 8 past the window: the policy after 2*W-token prompts (``--past-mult``) vs |
|   |        |       | stock holding the same live KV (S+W-token prompts), 128 new each (``--past-new``); |
|   |        |       | a second row gives the prefill phase of the same runs (2*W-token prompts, |
|   |        |       | streaming past S+W, vs S+W-token dense ones: tokens/s of unlike work, for scale) |
| 5 | W=1024 | stock | prefill of one 7000-token prompt (``--long-prompt``; max_new_tokens 1, the whole call |
|   |        |       | timed): the policy streams past S+W chunk by chunk, stock attends the whole prompt |

Sizes: the vLLM table's, cut to what 2 shared cores afford with two or three engines up: batch 8
(the issue's SGLang row used 8 streams; vLLM's table 16), case 4's prompts 2*W (vLLM's 4*W).
``--tiny`` (CI-sized: the tiny random Llama of tests/tiny_models.py, 4096 positions, fp32 weights
run in ``--dtype``): 50-token prompts, 256 new, dense W=512, case 4 at W=256 (512-token prompts,
128 new).

Timing. Decode runs stream (``generate(..., stream=True)``: one chunk per new token per request)
and are timed from the moment every request of the batch has its first token (prefill, and the
steps where some requests still prefill, excluded) to the last token; decode tokens = tokens
produced after that moment. (The moment is when this process sees the last first token, so a
decode step the scheduler ran meanwhile is counted in: at most one token per request.) Streaming
rather than "generate(N) - generate(1)": no second prefill, no difference of two noisy figures.
Prefill (case 3) is one non-streamed ``generate`` with ``max_new_tokens`` 1, tokens = prompt
tokens. CPU time: the model runs in SGLang's scheduler subprocess, so ``time.process_time()`` of
this process is not enough: CPU seconds (user + system, psutil) of this process and all its
descendants (every engine's scheduler and detokenizer) are summed before/after each timed phase.
The engines not being measured sleep while idle (``sleep_on_idle=True`` on every engine: SGLang's
idle scheduler otherwise spins a core at 100%, which on 2 cores would starve the measured one);
their CPU seconds during each run are kept in the JSON (``other_engines_cpu``) and a note is
printed if they ever exceed 2% of a run's (runs of at least 1 CPU-s).

Engines (only those the chosen ``--cases`` need; engines are keyed by window, so
``--dense-window`` equal to the window shares one): stock, and the policy (S = ``--sink-tokens``)
at W = 2048 (cases 1-3) and 1024 (cases 4-5). Every engine: same ``--dtype``, ``max_total_tokens``
(the largest batch * (prompt + new) of the chosen runs + 1024), ``chunked_prefill_size`` 2048
(case 3 is one prefill step; 1024 with --tiny), ``max_running_requests`` 16, ``random_seed`` 0,
radix cache off (the policy turns it off; stock would otherwise hit its cache on repeated prompts
only on one side), temperature 0, ``ignore_eos``; prompts are seeded random token ids, the same
for A and B of one repeat (B's shorter ones are prefixes). The policy also gets ``context_length``
max(model context, longest request). The policy turns SGLang's overlap schedule off; stock keeps
whatever SGLang resolves (printed at startup); ``--stock-disable-overlap`` turns it off there too.
Each engine serves one untimed warm-up request first. Dense cases compare the greedy tokens of
repeat 0 (same tokens column). A run where SGLang retracted a request (KV pool too small) is
flagged. No live-KV column: the plugin's per-step trace (``SGLANG_SINK_TRACE``) is file I/O on
the policy side only, so it stays off here (tests/sglang/test_sglang_engine.py checks the bound).

Env before sglang is imported (as tests/sglang/conftest.py): SGLANG_USE_CPU_ENGINE=1,
HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1, OMP_NUM_THREADS=1 (setdefault), and
tests/sglang/cpu_support (the CPU stand-in for the CUDA-only ``sgl_kernel``) first on sys.path
and PYTHONPATH. Printed at the start: threads, versions, dtype, model; per engine its resolved
settings and its subprocesses (pid, name, threads).

Runtime on the 2-core machine (SmolLM2-135M bf16, 2026-12-01, shared with another benchmark;
engines 12-30 s each with warm caches; KV pools of 0.1-0.4 GiB in bf16): ``--cases 1,2 --repeats 1``
2.5 min (runs 90 s); ``--cases 4 --repeats 1`` 6 min (runs 310 s, of which the policy's prefill of
8 x 2048 tokens past the window ~200 s wall: ~110 prompt tok/CPU-s vs stock's dense ~600). The
default (all cases, --repeats 3, three engines) is therefore ~30 min, case 4 ~15 of it. ``--cases 5``
(2026-12-06, load average ~9): 9 min, runs 6 min (a 7000-token prefill: policy ~35 s, stock ~93 s wall).
``--tiny --repeats 1``: ~1 min, nearly all engine startup (its sub-second runs are smoke, not
figures: psutil's CPU times tick at 10 ms). At exit, SGLang's shutdown kills every child of
this process, multiprocessing's resource tracker included, which then prints a harmless
``resource_tracker ... KeyError`` traceback.

    .venv-sglang/bin/python benchmarks/bench_flag_tax_sglang.py                     # SmolLM2 bf16
    .venv-sglang/bin/python benchmarks/bench_flag_tax_sglang.py --tiny --repeats 1  # CI-sized smoke run
    .venv-sglang/bin/python benchmarks/bench_flag_tax_sglang.py --cases 1,2 --dtype float32 --json out.json

The model: the SmolLM2 folder prepared by ``.venv/bin/streaming-sink-prepare model --dtype
bfloat16`` (or float32), under ~/.cache/streaming-sink/models/; ``--model`` for another one.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CPU_SUPPORT = os.path.join(ROOT, "tests", "sglang", "cpu_support")

# Before torch / sglang are imported (this module is also imported by SGLang's spawned
# subprocesses: every line up to main() must be cheap and idempotent).
for _k, _v in dict(SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_NUM_THREADS="1").items():
    os.environ.setdefault(_k, _v)
if sys.path[0] != CPU_SUPPORT:
    sys.path.insert(0, CPU_SUPPORT)
_pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if not _pp or _pp[0] != CPU_SUPPORT:
    os.environ["PYTHONPATH"] = os.pathsep.join([CPU_SUPPORT, *[p for p in _pp if p != CPU_SUPPORT]])

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

# the records, run order, table and JSON shared with bench_flag_tax.py (engine-free: cheap here too)
from flag_tax_common import (STOCK, Row, Run, dense_cases, engine_name, print_table, random_prompts,  # noqa: E402
                             run_all, table_rows, tiny_model, write_json)


@dataclasses.dataclass(frozen=True)
class Sizes:
    short_prompt: int  # cases 1-3
    dense_new: int  # cases 1-2
    batch: int  # cases 2, 3, 4
    dense_window: int  # cases 1-3
    window: int  # cases 4-5
    past_mult: int  # case 4: the policy's prompt is past_mult * window
    past_new: int
    chunk: int  # chunked_prefill_size (every engine)
    long_prompt: int  # case 5


FULL = Sizes(short_prompt=200, dense_new=256, batch=8, dense_window=2048, window=1024, past_mult=2,
             past_new=128, chunk=2048, long_prompt=7000)
TINY = Sizes(short_prompt=50, dense_new=256, batch=8, dense_window=512, window=256, past_mult=2,
             past_new=128, chunk=1024, long_prompt=3000)


def build_cases(z: Sizes, sinks: int) -> dict[str, tuple[dict[str, Run], list[Row]]]:
    w = z.window
    past = {"sink": Run(w, z.batch, z.past_mult * w, z.past_new),
            "stock": Run(STOCK, z.batch, sinks + w, z.past_new)}
    return {
        **dense_cases(z),
        "4": (past, [Row(f"b={z.batch} past the window: sink W={w} at {z.past_mult * w}-token prompts vs "
                         f"stock at {sinks + w} (same live KV), {z.past_new} new", "sink", "stock"),
                     Row(f"the same runs' prefill phase: {z.batch} x {z.past_mult * w} tokens (streaming past "
                         f"S+W) vs {z.batch} x {sinks + w} (dense); not the same work per token", "sink", "stock",
                         measure="prefill")]),
        "5": ({"sink": Run(w, 1, z.long_prompt, 1, "prefill"), "stock": Run(STOCK, 1, z.long_prompt, 1, "prefill")},
              [Row(f"one {z.long_prompt}-token prompt: sink W={w} (streaming past S+W) vs stock (dense)",
                   "sink", "stock")]),
    }


# ---- CPU seconds of this process tree ----------------------------------------------------------

class CpuClock:
    """CPU seconds (user + system) of this process and every descendant, per pid."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()

    def procs(self) -> list:
        return [self.me, *self.me.children(recursive=True)]

    def snapshot(self) -> dict[int, float]:
        out = {}
        for p in self.procs():
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return out


def cpu_split(c0: dict[int, float], c1: dict[int, float], own: set[int]) -> tuple[float, float]:
    """(all CPU seconds between the snapshots, the part of processes outside ``own``)."""
    total = other = 0.0
    for pid, t in c1.items():
        d = t - c0.get(pid, 0.0)
        total += d
        if pid not in own:
            other += d
    return total, other


# ---- driving one engine -------------------------------------------------------------------------

def run_decode(engine, clock: CpuClock, own: set[int], spec: Run, prompts: list[list[int]]) -> dict:
    sp = {"max_new_tokens": spec.new, "temperature": 0, "ignore_eos": True}
    n = len(prompts)
    counts, outputs, retractions, prompt_tokens = [0] * n, [None] * n, [0] * n, [0] * n
    start = None  # (wall, cpu snapshot, tokens so far) when every request has its first token
    c0, w0 = clock.snapshot(), time.perf_counter()
    for chunk in engine.generate(input_ids=prompts, sampling_params=sp, stream=True):
        i = chunk.get("index", 0)
        meta = chunk["meta_info"]
        counts[i] = meta["completion_tokens"]
        if start is None and all(counts):
            start = (time.perf_counter(), clock.snapshot(), sum(counts))
        if meta.get("finish_reason") is not None:
            outputs[i] = list(chunk["output_ids"])
            retractions[i] = meta.get("num_retractions", 0) or 0
            prompt_tokens[i] = meta.get("prompt_tokens", 0)
    w1, c1 = time.perf_counter(), clock.snapshot()
    assert start is not None and all(o is not None for o in outputs), "a request ended without output"
    assert sum(counts) == spec.new * n and all(len(o) == spec.new for o in outputs), (counts, spec)
    assert all(p == spec.prompt for p in prompt_tokens), (prompt_tokens, spec)  # nothing truncated
    ws, cs, tokens_at_start = start
    pre_cpu, pre_other = cpu_split(c0, cs, own)
    dec_cpu, dec_other = cpu_split(cs, c1, own)
    return dict(prefill_wall=ws - w0, prefill_cpu=pre_cpu, prefill_tokens=spec.prompt * n,
                decode_wall=w1 - ws, decode_cpu=dec_cpu, decode_tokens=spec.new * n - tokens_at_start,
                other_engines_cpu=dec_other, retractions=max(retractions), outputs=outputs)


def run_prefill(engine, clock: CpuClock, own: set[int], spec: Run, prompts: list[list[int]]) -> dict:
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    c0, w0 = clock.snapshot(), time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=sp)
    w1, c1 = time.perf_counter(), clock.snapshot()
    assert all(o["meta_info"]["prompt_tokens"] == spec.prompt for o in outs), spec
    cpu, other = cpu_split(c0, c1, own)
    return dict(prefill_wall=w1 - w0, prefill_cpu=cpu, prefill_tokens=spec.prompt * len(prompts),
                other_engines_cpu=other,
                retractions=max(o["meta_info"].get("num_retractions", 0) or 0 for o in outs),
                outputs=[list(o["output_ids"]) for o in outs])


def shutdown_all(engines: dict) -> None:
    """SGLang's ``Engine.shutdown`` kills every child of this process, the other engines'
    subprocesses too, and each engine's subprocess watchdog answers a dead child with SIGKILL
    of this process: stop every watchdog first, then shut the engines down."""
    for eng in engines.values():
        watchdog = getattr(getattr(eng, "tokenizer_manager", None), "_subprocess_watchdog", None)
        if watchdog is not None:
            watchdog.stop()
    for key, eng in reversed(list(engines.items())):
        try:
            eng.shutdown()
        except Exception as e:  # report, keep shutting the others down
            print(f"shutdown of {engine_name(key)} failed: {e!r}", file=sys.stderr)


SHOWN = ("attention_backend", "disable_radix_cache", "disable_overlap_schedule", "chunked_prefill_size",
         "max_total_num_tokens", "max_running_requests", "context_length", "sleep_on_idle", "dtype")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: the prepared SmolLM2-135M-Instruct folder of --dtype)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random Llama (4096 positions), shorter windows and prompts: CI-sized")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-window", type=int, help="cases 1-3: the policy's window (default 2048; 512 "
                                                     "with --tiny); every request stays below S + W")
    ap.add_argument("--past-mult", type=int, help="case 4: the policy's prompts are this many windows long "
                                                  "(default 2)")
    ap.add_argument("--past-new", type=int, help="case 4: new tokens per request (default 128)")
    ap.add_argument("--long-prompt", type=int, help="case 5: the prompt's tokens (default 7000; 3000 with --tiny)")
    ap.add_argument("--stock-disable-overlap", action="store_true",
                    help="stock with disable_overlap_schedule=True too (the policy always turns it off)")
    ap.add_argument("--cases", default="1,2,3,4,5", help="comma-separated subset of 1-5")
    ap.add_argument("--json", help="write every raw figure here")
    args = ap.parse_args()

    z = TINY if args.tiny else FULL
    if args.dense_window is not None:
        z = dataclasses.replace(z, dense_window=args.dense_window)
    if args.past_mult is not None:
        if args.past_mult < 2:
            ap.error("--past-mult must be >= 2 (the prompt must reach past sinks + window)")
        z = dataclasses.replace(z, past_mult=args.past_mult)
    if args.past_new is not None:
        z = dataclasses.replace(z, past_new=args.past_new)
    if args.long_prompt is not None:
        z = dataclasses.replace(z, long_prompt=args.long_prompt)
    if z.short_prompt + z.dense_new >= args.sink_tokens + z.dense_window:
        ap.error(f"--dense-window {z.dense_window}: cases 1-3 must stay below S + W "
                 f"({z.short_prompt + z.dense_new} tokens a request)")
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = build_cases(z, args.sink_tokens)
    if bad := [c for c in chosen if c not in cases]:
        ap.error(f"--cases: unknown {bad} (known: {', '.join(cases)})")
    cases = {c: cases[c] for c in chosen}
    keys = sorted({r.engine for runs, _ in cases.values() for r in runs.values()}, key=lambda k: (k != STOCK, k))

    if args.model:
        model = args.model
    elif args.tiny:
        model = tiny_model()
    else:
        from streaming_sink_tools.prepare import AssetError, default_model_path

        try:
            model = default_model_path(prepare=False, dtype=args.dtype)
        except AssetError as e:
            sys.exit(f"{e}\n(from the vLLM venv: .venv/bin/streaming-sink-prepare model --dtype {args.dtype})")

    import psutil
    import torch

    import sglang

    cfg = json.load(open(os.path.join(model, "config.json")))
    context = cfg["max_position_embeddings"]
    vocab = cfg["vocab_size"] - 1  # prompt ids below the last: SGLang treats it specially (tests/sglang/sglang_helpers)
    all_runs = [r for runs, _ in cases.values() for r in runs.values()]
    longest = max(r.prompt + r.new for r in all_runs)
    stock_longest = max((r.prompt + r.new for r in all_runs if r.engine == STOCK), default=0)
    if stock_longest > context:
        sys.exit(f"stock runs need {stock_longest} tokens, the model's context is {context}")
    pool = max(r.batch * (r.prompt + r.new) for r in all_runs) + 1024

    settings = dict(
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
        SGLANG_CPU_OMP_THREADS_BIND=os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"),
        SGLANG_USE_CPU_ENGINE=os.environ.get("SGLANG_USE_CPU_ENGINE"),
        torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), sglang=sglang.__version__,
        torch=torch.__version__, psutil=psutil.__version__, dtype=args.dtype, model=model, context=context,
        sink_tokens=args.sink_tokens, max_total_tokens=pool, chunked_prefill_size=z.chunk,
        repeats=args.repeats, cases=chosen, load_avg_start=os.getloadavg(),
        mem_available_gib=round(psutil.virtual_memory().available / 2**30, 1))
    print("flag tax (SGLang): " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)

    common = dict(model_path=model, device="cpu", attention_backend="torch_native", dtype=args.dtype,
                  random_seed=0, log_level="error", max_total_tokens=pool, chunked_prefill_size=z.chunk,
                  max_running_requests=max(16, z.batch), disable_radix_cache=True, sleep_on_idle=True)
    clock = CpuClock()
    engines: dict[int, object] = {}
    own: dict[int, set[int]] = {}  # this process + the engine's own subprocesses
    startup: dict[str, float] = {}
    resolved: dict[str, dict] = {}
    t_all = time.perf_counter()
    try:
        for key in keys:
            before = {p.pid for p in clock.procs()}
            t0 = time.perf_counter()
            print(f"== starting {engine_name(key)} ...", flush=True)
            if key == STOCK:
                kw = dict(common)
                if args.stock_disable_overlap:
                    kw["disable_overlap_schedule"] = True
            else:
                kw = dict(common, kv_policy="streaming-sink", sink_tokens=args.sink_tokens, sink_window=key,
                          context_length=max(context, longest + 16))
            engines[key] = sglang.Engine(**kw)
            name = engine_name(key)
            startup[name] = time.perf_counter() - t0
            new = [p for p in clock.procs() if p.pid not in before]
            own[key] = {clock.me.pid, *(p.pid for p in new)}
            info = engines[key].get_server_info()
            resolved[name] = {k: info.get(k) for k in SHOWN}
            procs = ", ".join(f"{p.pid} {p.name()} ({p.num_threads()} threads, "
                              f"{p.memory_info().rss / 2**30:.2f} GiB)" for p in new)
            print(f"== {name} up in {startup[name]:.0f} s: "
                  + ", ".join(f"{k}={v}" for k, v in resolved[name].items()) + f"; subprocesses: {procs}",
                  flush=True)
            # untimed warm-up: first-call costs (allocations, lazy tables) stay out of the runs
            engines[key].generate(input_ids=random_prompts(2, 32, vocab, seed=7),
                                  sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
        settings["torch_threads_after_startup"] = torch.get_num_threads()

        def run_one(spec: Run, prompts: list[list[int]], tag: str) -> dict:
            fn = run_prefill if spec.measure == "prefill" else run_decode
            return fn(engines[spec.engine], clock, own[spec.engine], spec, prompts)

        raw, runs_s = run_all(cases, args.repeats, vocab, run_one)
        report(args, cases, raw, settings, resolved, startup, runs_s, model, z, t_all)
    finally:
        shutdown_all(engines)


# ---- the table ----------------------------------------------------------------------------------

def side_extra(rs: list[dict], measure: str) -> dict:
    """SGLang's own figures of one side: retractions, the most CPU share idle engines took of a run."""
    return dict(retractions=max(r["retractions"] for r in rs),
                other_engines_cpu_share=max(  # below 1 CPU-s it is psutil's 10 ms ticks
                    (r["other_engines_cpu"] / r[f"{measure}_cpu"] for r in rs if r[f"{measure}_cpu"] >= 1),
                    default=0.0))


def report(args, cases, raw, settings, resolved, startup, runs_s, model, z, t_all) -> None:
    import sglang

    table = table_rows(cases, raw, side_extra)

    print(f"\nflag tax (SGLang {sglang.__version__}, CPU, torch_native): {os.path.basename(model.rstrip('/'))} "
          f"{args.dtype}, S={args.sink_tokens}, OMP_NUM_THREADS={settings['OMP_NUM_THREADS']}, torch threads "
          f"{settings['torch_threads_after_startup']}, stock overlap schedule "
          f"{'off' if resolved.get('stock', {}).get('disable_overlap_schedule') else 'on'}; median of "
          f"{args.repeats}; load avg {settings['load_avg_start'][0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print("A = policy on, B = stock; ratio = A / B (tok per CPU-s of this process + its subprocesses | "
          "wall tok/s)\n")
    print_table(table)
    if any(e["a_retractions"] or e["b_retractions"] for e in table):
        print("WARNING: SGLang retracted some requests (KV pool too small)")
    if (share := max(max(e["a_other_engines_cpu_share"], e["b_other_engines_cpu_share"]) for e in table)) > 0.02:
        print(f"NOTE: idle engines used up to {100 * share:.1f}% of a run's CPU seconds")
    print("\nengine startup: " + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items())
          + f"; runs {runs_s:.0f} s; total {time.perf_counter() - t_all:.0f} s")

    if args.json:
        write_json(args.json, settings, z, cases, table, raw, startup_s=startup, resolved=resolved, runs_s=runs_s)


if __name__ == "__main__":
    main()
