"""Open question: does a model with LEARNED sink logits still need real sink tokens
once its full-attention layers are windowed?

GPT-OSS gives every head a learned logit in the softmax denominator ("pay no
attention"), the job StreamingLLM's sink tokens do in models without one. With
``--kv-policy streaming-sink`` its full-attention layers become sink+window layers
(its 128-token sliding layers keep their own window); the learned sinks stay on
in every configuration. This script measures streaming perplexity with ``S=0``
(the full layers see only their window) against ``S=4`` (the first 4 tokens kept)
at the same KV budget, next to the dense model (stock vLLM) as the reference:

    .venv/bin/python benchmarks/gptoss_sink_ablation.py --model /models/gpt-oss-20b
    .venv/bin/python benchmarks/gptoss_sink_ablation.py --model M --tokens 65536 --cache 1024,4096 \\
        --sinks 0,4 --book all --engine-arg tensor_parallel_size=2

``--model`` is a real GPT-OSS checkpoint folder (HF layout, its own tokenizer);
the text is the Austen corpus of ``streaming-sink-prepare`` (or ``--text FILE``),
tokenized with the model's tokenizer, streamed as ONE teacher-forced prompt
(see benchmarks/streaming_perplexity.py, whose machinery this reuses). Writes
``--out`` (json, after every configuration), ``--plot`` (png) and prints tables.
A configuration ``S<n>@<C>`` holds ``C`` KV token slots per request in the full
layers: ``ceil(n/bs)`` sink blocks + a window ``W = C - ceil(n/bs)*bs``.

NOT RUN on a real checkpoint in this repository (no GPU-sized vLLM here, no model
hub access): see docs/gpt-oss.md. ``--smoke`` runs it on the tiny random GPT-OSS
of tests/ to show the script works (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import streaming_perplexity as sp  # noqa: E402  (sets the offline/in-process env first)

DEFAULT_OUT = ROOT / "docs" / "gpt-oss-sink-ablation.json"
DEFAULT_PLOT = ROOT / "docs" / "gpt-oss-sink-ablation.png"


def model_info(model: str) -> dict:
    cfg = json.loads((Path(model) / "config.json").read_text())
    if cfg.get("model_type") != "gpt_oss":
        raise SystemExit(f"{model} is a {cfg.get('model_type')!r} model, not GPT-OSS (learned sinks)")
    return {"context": int(cfg["max_position_embeddings"]), "sliding_window": cfg.get("sliding_window"),
            "layer_types": cfg.get("layer_types"), "dtype": sp.model_dtype(model)}


def load_ids(model: str, n_tokens: int, text_file: str | None, book: str) -> list[int]:
    """The first ``n_tokens`` of the text, in the model's own tokenizer (no chat template)."""
    from transformers import AutoTokenizer

    if text_file:
        text = Path(text_file).read_text(encoding="utf-8")
    else:
        from streaming_sink_tools.prepare import corpus_text

        text = corpus_text(None if book in (None, "all") else book)
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise SystemExit(f"the text has only {len(ids)} tokens of this tokenizer; ask for fewer --tokens "
                         f"(or --book all / a longer --text)")
    return ids[:n_tokens]


def run(model: str, cfg: sp.Config, ids: list[int], args, engine_kwargs: dict) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    llm = sp.make_engine(model, cfg, len(ids), block_size=args.block_size, chunk=args.chunk,
                         dtype=args.dtype, eager=not args.compile, **engine_kwargs)
    init_s = time.perf_counter() - t0
    try:
        prompt = ids[:sp.max_prompt(llm)]
        with tqdm(total=len(prompt), desc=cfg.name, unit="tok", unit_scale=True, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            t1 = time.perf_counter()
            nll = sp.token_nll(llm, prompt, progress=bar)
            run_s = time.perf_counter() - t1
        dtype = str(llm.llm_engine.vllm_config.model_config.dtype).replace("torch.", "")
    finally:
        del llm
        gc.collect()
    sums, counts = sp.bucket_sums(nll)
    return {"config": cfg.name, "label": cfg.label(args.block_size),
            "sinks": cfg.sinks, "cache": cfg.cache, "window": cfg.window(args.block_size),
            "block_size": args.block_size, "chunk": args.chunk, "dtype": dtype, "tokens": len(prompt),
            "init_s": round(init_s, 1), "run_s": round(run_s, 1), "tokens_per_s": round(len(prompt) / run_s, 1),
            "ppl": math.exp(float(nll.mean())), "bucket": sp.BUCKET, "nll_sums": sums, "counts": counts}


def verdict(results: list[dict], lo: int) -> str:
    """S=0 vs S=4 (every cache size): perplexity of the tokens past ``lo``, and the ratio."""
    lines = []
    for cache in sorted({r["cache"] for r in results if r["cache"]}):
        by_s = {r["sinks"]: r for r in results if r["cache"] == cache}
        if 0 in by_s and 4 in by_s:
            hi = min(by_s[0]["tokens"], by_s[4]["tokens"]) // sp.BUCKET * sp.BUCKET
            p0, p4 = sp.ppl(by_s[0], lo, hi), sp.ppl(by_s[4], lo, hi)
            if p0 and p4:
                lines.append(f"cache {cache}: tokens [{lo}, {hi}) perplexity S=0 {p0:.3f}, S=4 {p4:.3f}, "
                             f"S=0/S=4 = {p0 / p4:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GPT-OSS checkpoint folder (HF layout + tokenizer)")
    ap.add_argument("--smoke", action="store_true",
                    help="no checkpoint: build the tiny random GPT-OSS of tests/ and run a short stream")
    ap.add_argument("--tokens", type=int, default=32768, help="stream length (default 32768)")
    ap.add_argument("--cache", default="1024,4096", help="KV token slots per request in the full layers, "
                                                         "comma list (default 1024,4096)")
    ap.add_argument("--sinks", default="0,4", help="sink-token counts to compare (default 0,4)")
    ap.add_argument("--no-dense", action="store_true", help="skip the stock-vLLM dense reference")
    ap.add_argument("--book", default="all", help="Austen novel or 'all' (default all)")
    ap.add_argument("--text", help="a UTF-8 text file to stream instead of the Austen corpus")
    ap.add_argument("--dtype", help="engine dtype (default: the checkpoint's)")
    ap.add_argument("--block-size", type=int, default=32, help="KV block size (CPU: multiple of 32; default 32)")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens (prefill chunk; default 2048)")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile / capture graphs (default eager)")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra vllm.LLM keyword (repeatable; VALUE parsed as JSON when it can be), "
                         "e.g. tensor_parallel_size=2, gpu_memory_utilization=0.9")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results json")
    ap.add_argument("--plot", default=str(DEFAULT_PLOT), help="png to write ('' for none)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_gptoss

        args.model = build_tiny_gptoss(Path(os.environ.get("TMPDIR", "/tmp")) / "tiny-gptoss-smoke")
        args.dtype = args.dtype or "float32"
    if not args.model:
        ap.error("--model PATH (a GPT-OSS checkpoint) or --smoke")
    info = model_info(args.model)
    engine_kwargs = {}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        try:
            engine_kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            engine_kwargs[key] = value

    configs = [] if args.no_dense else [sp.Config("dense")]
    for cache in (int(c) for c in args.cache.split(",")):
        for s in (int(s) for s in args.sinks.split(",")):
            cfg = sp.parse_config(f"S{s}@{cache}")
            window = cfg.window(args.block_size)
            if info["sliding_window"] and info["sliding_window"] - 1 > window:
                raise SystemExit(f"{cfg.name}: window {window} is shorter than the model's sliding layers "
                                 f"({info['sliding_window']}): raise --cache")
            configs.append(cfg)

    ids = load_ids(args.model, args.tokens, args.text, args.book)
    import vllm

    settings = {"model": Path(args.model).name, "book": "text:" + Path(args.text).name if args.text else args.book,
                "tokens": args.tokens, "block_size": args.block_size, "chunk": args.chunk,
                "dtype": args.dtype or info["dtype"], "engine_args": engine_kwargs, "smoke": args.smoke}
    results = []
    t_start = time.perf_counter()
    for cfg in configs:
        r = run(args.model, cfg, ids, args, engine_kwargs)
        r["vllm"] = vllm.__version__
        results.append(r)
        print(f"{cfg.name}: {r['tokens']} tokens, ppl {r['ppl']:.3f}, {r['run_s']:.0f} s", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({
                "question": "learned sinks on: S=0 vs S=4 real sink tokens once full layers are windowed",
                "settings": settings, "context": info["context"], "results": results,
                "wall_s": round(time.perf_counter() - t_start, 1)}, indent=1) + "\n")

    # Compare past the largest window (where the configurations start to differ).
    lo = max(2 * max((r["cache"] or 0) for r in results), sp.BUCKET) // sp.BUCKET * sp.BUCKET
    smooth = min(1024, max(sp.BUCKET, args.tokens // 16 // sp.BUCKET * sp.BUCKET))
    plotted = [r for r in results if r["tokens"] >= smooth]  # a dense run shorter than one point: left out
    if args.plot and plotted:
        # (the shared plot labels a context line "8k": only draw it for a real checkpoint)
        sp.plot(plotted, args.plot, context=None if args.smoke else info["context"], smooth=smooth,
                title=f"{settings['model']}{' (SMOKE: tiny random model, meaningless numbers)' if args.smoke else ''}"
                      f"\nlearned sinks on everywhere: S=0 vs S=4 sink tokens, vLLM {vllm.__version__} "
                      f"+ streaming-sink, block {args.block_size}")
    print(f"\n{settings['model']} (context {info['context']}, sliding layers {info['sliding_window']}), "
          f"{settings['book']}, {len(ids)} tokens, learned sinks on in every configuration")
    print(sp.table(results, args.tokens))
    if (text := verdict(results, lo)):
        print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
