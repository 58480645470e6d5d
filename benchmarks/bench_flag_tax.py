"""The flag tax: what `--kv-policy streaming-sink` costs next to stock vLLM (issue 10's table).

All engines live in one process (in-process engine core, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
and stay up for the whole run; within a case their runs alternate (A B A B ...), so machine
noise hits both alike. Every figure is the median of ``--repeats`` runs and comes twice:
tokens per process CPU-second (``time.process_time()`` around the engine steps: held within a
few % on the loaded 2-core machines) and wall tokens/s (swings with the machine's load). Each
row gives policy / reference ratios of both.

| case | A (policy on) | B (reference) | what |
|---|---|---|---|
| 1 | W=2048 | stock | decode, batch 1, 200-token prompts, 256 new (dense regime: same outputs) |
| 2 | W=2048 | stock | the same, batch 16 |
| 3 | W=2048 | stock | prefill of 16 x 200-token prompts (tok/CPU-s, tok/s, CPU s, wall s) |
| 4 | W=1024, W=4096 | stock | one stream, 2048-token prompt, decode 128 (W=1024 streams there, 4096 is dense) |
| 5 | W=1024 | stock | batch 16 past the window: the policy after 4*W-token prompts (``--past-mult``) |
|   |        |       | vs stock holding the same live KV (S+W-token prompts), 128 new each |
| 6a | W=4096 | W=1024 | cost follows live context: one 500-token request (372 + 128 new), either window |
| 6b | W=128 at 64x | W=128 at 1x | decode 128 after a 64*W = 8192-token prompt vs after a W-token one |

Engines (created once each, only those the chosen ``--cases`` need, never deleted: deleting an
in-process engine tears down vLLM's process-wide state): stock, and the policy (S =
``--sink-tokens``) at W = 2048, 1024, 4096 and 128. With the default block 128, W=128 is a
one-block window, the smallest the block allows; its 64x prompt (8192 tokens) is what 2 cores
afford. Every engine: same ``--block-size``, ``--dtype``, ``max_num_seqs`` 16,
``max_num_batched_tokens`` 4096 (case 3 is one prefill step), prefix caching off (the policy turns
it off; stock would otherwise hit its cache on the repeated prompts), temperature 0, ``ignore_eos``;
prompts are seeded random token ids, the same for A and B of one repeat (B's shorter ones are
prefixes). Decode is timed from the step after every request has its first token (prefill and the
mixed prefill/decode steps excluded) to the end. The table also gives the most live KV blocks one
request held while decoding (the engine's own KV manager) and, where outputs must match (dense
regime), how many requests produced the same greedy tokens (repeat 0). KV cache:
``VLLM_CPU_KVCACHE_SPACE`` GiB per engine (default 2; case 5 in fp32 needs ~1.2 GiB); a run that
preempted a request is flagged.

Threads: ``OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set (stable figures on the
loaded 2-core machines); printed at the start with torch's thread count, vLLM's version, dtype, model.

Runtime on the 2-core machine (SmolLM2-135M fp32, policy CPU path of 2026-12-01, --repeats 3):
about 25 min. Engines 45 s each with a warm torch.compile cache (1-3 min cold), 5 of them; case 5
takes ~15 min of the runs (its policy side prefills 16 x 4096 tokens at ~260 tok/s: ~250 s a
repeat; ``--past-mult 2`` halves that), cases 1-4 and 6 ~5 min together. ``--tiny`` (CI-sized: the
tiny random Llama of tests/tiny_models.py, 4096 context, block 32, windows 512/256/1024/32, 50-250
token prompts) takes ~1.5 min, nearly all engine startup.

``--hf-attention-sinks`` adds to case 5 the HF reference, PyPI ``attention-sinks`` 0.4.0 at the
same S and W (``attention_sink_window_size=W``), batch 16, in its own venv ``.venv-hf`` (made on
first use, ~30 s from the machine's local wheels: torch 2.13.0+cpu, transformers 4.34.0,
tokenizers 0.14.1, einops), run by benchmarks/hf_attention_sinks_worker.py: a subprocess that
stays up and takes its turn in the A B C rotation. It gets a model copy with ``"rope_theta"``
written in (transformers 4.34 ignores ``rope_parameters`` and would use 10000) and token ids
(tokenizers 0.14 cannot read SmolLM2's tokenizer.json). Its prompts are the first W + W/4 tokens
of case 5's: its cache is S+W from there on, so its decode costs the same however far past the
window, and HF prefills at ~190 tok/s (4*W prompts would cost 5+ min a repeat). Prefill in chunks
of 256 tokens. Adds ~3 min a repeat with SmolLM2 (~7 s with --tiny).

    .venv/bin/python benchmarks/bench_flag_tax.py                    # the table, SmolLM2 fp32
    .venv/bin/python benchmarks/bench_flag_tax.py --tiny --repeats 1 # CI-sized smoke run
    .venv/bin/python benchmarks/bench_flag_tax.py --cases 1,2 --dtype bfloat16 --json out.json
    .venv/bin/python benchmarks/bench_flag_tax.py --cases 5 --hf-attention-sinks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

# Before torch / vLLM are imported: their thread pools read these once.
for k, v in dict(OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1",
                 TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2", VLLM_NO_USAGE_STATS="1",
                 DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1", VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402

import vllm  # noqa: E402
import vllm_sink  # noqa: E402,F401  (adds kv_policy / sink_tokens / sink_window to LLM)
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402

# the records, run order, table and JSON shared with bench_flag_tax_sglang.py
from flag_tax_common import (STOCK, Row, Run, dense_cases, engine_name, print_table, run_all,  # noqa: E402
                             table_rows, tiny_model, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HF_VENV = os.path.join(ROOT, ".venv-hf")
HF_PACKAGES = ["torch==2.13.0", "transformers==4.34.0", "tokenizers==0.14.1", "attention-sinks==0.4.0", "einops"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    block: int
    short_prompt: int  # cases 1-3
    dense_new: int  # cases 1-2
    batch: int  # cases 2, 3, 5
    dense_window: int  # cases 1-3
    long_context: int  # case 4 prompt
    long_new: int
    window: int  # cases 4, 5, 6a
    big_window: int  # cases 4, 6a
    past_mult: int  # case 5: the policy's prompt is past_mult * window
    past_new: int
    request_len: int  # case 6a: prompt + new
    request_new: int
    small_window: int  # case 6b
    far_mult: int  # case 6b: the far prompt is far_mult * small_window
    far_new: int
    max_batched: int  # max_num_batched_tokens (every engine)


FULL = Sizes(block=128, short_prompt=200, dense_new=256, batch=16, dense_window=2048, long_context=2048,
             long_new=128, window=1024, big_window=4096, past_mult=4, past_new=128, request_len=500,
             request_new=128, small_window=128, far_mult=64, far_new=128, max_batched=4096)
TINY = Sizes(block=32, short_prompt=50, dense_new=256, batch=16, dense_window=512, long_context=512,
             long_new=256, window=256, big_window=1024, past_mult=4, past_new=128, request_len=250,
             request_new=128, small_window=32, far_mult=64, far_new=256, max_batched=1024)


def build_cases(z: Sizes, sinks: int, hf: bool) -> dict[str, tuple[dict[str, Run], list[Row]]]:
    w, bw, sw = z.window, z.big_window, z.small_window
    long_ = Run(w, 1, z.long_context, z.long_new)
    req = Run(bw, 1, z.request_len - z.request_new, z.request_new)
    past = {"sink": Run(w, z.batch, z.past_mult * w, z.past_new),
            "stock": Run(STOCK, z.batch, sinks + w, z.past_new)}
    rows5 = [Row(f"b={z.batch} past the window: sink W={w} at {z.past_mult * w}-token prompts vs stock "
                 f"at {sinks + w} (same live KV)", "sink", "stock")]
    if hf:
        past["hf"] = Run("hf", z.batch, w + w // 4, z.past_new)
        rows5.append(Row(f"b={z.batch} past the window: sink W={w} ({z.past_mult * w}-token prompts) vs "
                         f"HF attention-sinks S={sinks} W={w} ({w + w // 4}-token prompts)", "sink", "hf"))
    return {
        **dense_cases(z),
        "4": ({"W": long_, "bigW": dataclasses.replace(long_, engine=bw),
               "stock": dataclasses.replace(long_, engine=STOCK)},
              [Row(f"b=1 at {z.long_context} context, W={w} (streaming)", "W", "stock"),
               Row(f"b=1 at {z.long_context} context, W={bw} (dense)", "bigW", "stock", True)]),
        "5": (past, rows5),
        "6": ({"bigW": req, "W": dataclasses.replace(req, engine=w),
               "far": Run(sw, 1, z.far_mult * sw, z.far_new), "near": Run(sw, 1, sw, z.far_new)},
              [Row(f"{z.request_len}-token request ({z.request_new} new): W={bw} vs W={w}", "bigW", "W", True),
               Row(f"{z.far_new} tokens, W={sw}: after a {z.far_mult}x-window prompt vs a 1x one", "far", "near",
                   a_name=f"sink W={sw} @{z.far_mult}x", b_name=f"sink W={sw} @1x")]),
    }


# ---- driving one engine -----------------------------------------------------------------------

def scheduler_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.scheduler


def peek(llm: LLM) -> tuple[int, int]:
    """(most live KV blocks one request holds, most preemptions of one request): every request in
    the scheduler, which holds only the running batch (its ids carry a random suffix)."""
    sched = scheduler_of(llm)
    counts: dict[str, int] = {}
    for manager in sched.kv_cache_manager.coordinator.single_type_managers:
        for rid, blocks in manager.req_to_blocks.items():
            counts[rid] = counts.get(rid, 0) + sum(not b.is_null for b in blocks)
    return max(counts.values(), default=0), max((r.num_preemptions for r in sched.requests.values()), default=0)


def run_vllm(llm: LLM, spec: Run, prompts: list[list[int]], tag: str) -> dict:
    """Prefill and decode of one batch; the measured phases' wall/CPU seconds and token counts."""
    engine = llm.llm_engine
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p},
                           SamplingParams(max_tokens=spec.new, temperature=0, ignore_eos=True,
                                          output_kind=RequestOutputKind.DELTA))
    out = {rid: [] for rid in ids}
    t = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}  # [wall, cpu]
    phase, decode_start_tokens, preempt = "prefill", 0, 0
    peak = {"prefill": 0, "decode": 0}  # live KV blocks of one request, after a step of the phase
    while engine.has_unfinished_requests():
        w0, c0 = time.perf_counter(), time.process_time()
        step = engine.step()
        t[phase][0] += time.perf_counter() - w0
        t[phase][1] += time.process_time() - c0
        for o in step:
            out[o.request_id].extend(o.outputs[0].token_ids)
        b, p = peek(llm)
        peak[phase], preempt = max(peak[phase], b), max(preempt, p)
        if phase == "prefill" and all(out.values()):
            phase, decode_start_tokens = "decode", sum(map(len, out.values()))
    total = sum(map(len, out.values()))
    assert total == spec.new * len(prompts), (total, spec)
    return dict(prefill_wall=t["prefill"][0], prefill_cpu=t["prefill"][1],
                prefill_tokens=spec.prompt * len(prompts),
                decode_wall=t["decode"][0], decode_cpu=t["decode"][1], decode_tokens=total - decode_start_tokens,
                peak_blocks_prefill=peak["prefill"], peak_blocks_decode=peak["decode"], preemptions=preempt,
                outputs=[out[rid] for rid in ids])


# ---- the HF reference (a worker in its own venv) ---------------------------------------------

def hf_python() -> str:
    py = os.path.join(HF_VENV, "bin", "python")
    probe = "import torch, transformers, attention_sinks, einops; print(torch.__version__, transformers.__version__)"
    if os.path.exists(py) and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"== creating {HF_VENV} ({' '.join(HF_PACKAGES)}) ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", HF_VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *HF_PACKAGES], check=True)
    subprocess.run([py, "-c", probe], check=True)
    print(f"== {HF_VENV} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return py


def hf_model_copy(model: str, dtype: str) -> str:
    """The model folder as transformers 4.34 reads it: rope_theta written in, weights linked."""
    cfg = json.load(open(os.path.join(model, "config.json")))
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        sys.exit(f"--hf-attention-sinks: {model} uses rope_type {rope.get('rope_type')!r}; only default RoPE")
    cfg["rope_theta"] = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    cfg.pop("rope_parameters", None)
    cfg["torch_dtype"] = dtype
    out = tempfile.mkdtemp(prefix="hf-sinks-model-")
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    for name in os.listdir(model):
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            os.symlink(os.path.join(model, name), os.path.join(out, name))
    return out


class HFWorker:
    def __init__(self, model: str, dtype: str, sinks: int, window: int):
        py = hf_python()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="hf-sinks-", suffix=".log", delete=False)
        cmd = [py, os.path.join(HERE, "hf_attention_sinks_worker.py"), "--model", hf_model_copy(model, dtype),
               "--dtype", dtype, "--sink-tokens", str(sinks), "--window", str(window)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            sys.exit(f"HF worker died; its log ({self.log.name}):\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def run(self, spec: Run, prompts: list[list[int]]) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": [p[:spec.prompt] for p in prompts], "new": spec.new}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- the table ---------------------------------------------------------------------------------

def side_extra(rs: list[dict], measure: str) -> dict:
    """vLLM's own figures of one side: most live KV blocks of a request while decoding, preemptions."""
    return dict(peak_blocks=max(r.get("peak_blocks_decode", -1) for r in rs) if measure == "decode" else -1,
                preemptions=max(r.get("preemptions", 0) for r in rs))


def live_blocks(e: dict) -> str:
    return "/".join("-" if e[f"{s}_peak_blocks"] < 0 else str(e[f"{s}_peak_blocks"]) for s in "ab")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: the prepared SmolLM2-135M-Instruct float32 folder, "
                                    "built by streaming-sink-prepare if missing)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random Llama (4096 context), block 32, shorter windows and prompts: CI-sized")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--block-size", type=int, help="KV block size (default 128, vLLM CPU's; 32 with --tiny); "
                                                   "must divide every window")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--past-mult", type=int, help="case 5: the policy's prompts are this many windows long "
                                                  "(default 4)")
    ap.add_argument("--cases", default="1,2,3,4,5,6", help="comma-separated subset of 1-6")
    ap.add_argument("--json", help="write every raw figure here")
    ap.add_argument("--hf-attention-sinks", action="store_true",
                    help="add the HF attention-sinks 0.4.0 reference to case 5 (own venv .venv-hf)")
    args = ap.parse_args()

    z = TINY if args.tiny else FULL
    if args.block_size:
        z = dataclasses.replace(z, block=args.block_size,
                                small_window=max(z.small_window, args.block_size))
    if args.past_mult is not None:
        if args.past_mult < 2:
            ap.error("--past-mult must be >= 2 (the prompt must reach past sinks + window)")
        z = dataclasses.replace(z, past_mult=args.past_mult)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = build_cases(z, args.sink_tokens, args.hf_attention_sinks)
    if bad := [c for c in chosen if c not in cases]:
        ap.error(f"--cases: unknown {bad} (known: {', '.join(cases)})")
    if args.hf_attention_sinks and "5" not in chosen:
        ap.error("--hf-attention-sinks belongs to case 5: add 5 to --cases")
    cases = {c: cases[c] for c in chosen}
    keys = sorted({r.engine for runs, _ in cases.values() for r in runs.values() if r.engine != "hf"},
                  key=lambda k: (k != STOCK, k))
    if bad := [k for k in keys if k != STOCK and k % z.block]:
        ap.error(f"--block-size {z.block} does not divide the window(s) {bad}")

    if args.model:
        model = args.model
    elif args.tiny:
        model = tiny_model()
    else:
        from streaming_sink_tools.prepare import default_model_path

        model = default_model_path(prepare=True, dtype="float32")
    cfg = json.load(open(os.path.join(model, "config.json")))
    context, vocab = cfg["max_position_embeddings"], cfg["vocab_size"]
    longest = max(r.prompt + r.new for runs, _ in cases.values() for r in runs.values())

    settings = dict(
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
        VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), vllm=vllm.__version__, torch=torch.__version__,
        dtype=args.dtype, model=model, context=context, block_size=z.block, sink_tokens=args.sink_tokens,
        repeats=args.repeats, cases=chosen, load_avg_start=os.getloadavg())
    print("flag tax: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)

    common = dict(model=model, dtype=args.dtype, block_size=z.block, seed=0, max_num_seqs=max(16, z.batch),
                  max_num_batched_tokens=z.max_batched, enable_prefix_caching=False)
    engines: dict[int, LLM] = {}
    startup: dict[str, float] = {}
    for key in keys:
        t0 = time.perf_counter()
        print(f"== starting {engine_name(key)} ...", flush=True)
        if key == STOCK:
            engines[key] = LLM(**common, max_model_len=context)
        else:
            engines[key] = LLM(**common, max_model_len=max(context, longest), kv_policy="streaming-sink",
                               sink_tokens=args.sink_tokens, sink_window=key)
        startup[engine_name(key)] = time.perf_counter() - t0
        print(f"== {engine_name(key)} up in {startup[engine_name(key)]:.0f} s", flush=True)
    settings["torch_threads_after_startup"] = torch.get_num_threads()
    hf = None
    if args.hf_attention_sinks:
        t0 = time.perf_counter()
        hf = HFWorker(model, args.dtype, args.sink_tokens, z.window)
        startup["hf"] = time.perf_counter() - t0
        settings["hf_worker"] = hf.info
        print(f"== HF attention-sinks worker up in {startup['hf']:.0f} s: {hf.info}", flush=True)

    def run_one(spec: Run, prompts: list[list[int]], tag: str) -> dict:  # HF takes its turn: A B (C) A B (C) ...
        return hf.run(spec, prompts) if spec.engine == "hf" else run_vllm(engines[spec.engine], spec, prompts, tag)

    raw, runs_s = run_all(cases, args.repeats, vocab, run_one)
    if hf:
        hf.close()

    table = table_rows(cases, raw, side_extra)

    print(f"\nflag tax: {os.path.basename(model.rstrip('/'))} {args.dtype}, block {z.block}, S={args.sink_tokens}, "
          f"OMP_NUM_THREADS={settings['OMP_NUM_THREADS']}, bind={settings['VLLM_CPU_OMP_THREADS_BIND']}, "
          f"torch threads {settings['torch_threads_after_startup']}, vLLM {vllm.__version__}; median of "
          f"{args.repeats}; load avg {settings['load_avg_start'][0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print("A = policy on (first named), B = the reference; ratio = A / B (tok per process CPU-s | wall tok/s)\n")
    print_table(table, extra=(("decode live blocks/req A / B", live_blocks),))
    if any(e["a_preemptions"] or e["b_preemptions"] for e in table):
        print("WARNING: some requests were preempted (KV cache too small): raise VLLM_CPU_KVCACHE_SPACE")
    print("\nengine startup: " + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items())
          + f"; runs {runs_s:.0f} s")

    if args.json:
        write_json(args.json, settings, z, cases, table, raw, startup_s=startup, runs_s=runs_s)


if __name__ == "__main__":
    main()
