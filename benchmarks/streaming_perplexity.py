"""Perplexity of a real model streaming far past its context: the real vLLM engine + the plugin.

One long Austen token stream (SmolLM2 tokenizer) goes through vLLM as ONE prompt,
teacher-forced: the engine's own prompt logprobs (chunked prefill) give
-log p(token_i | tokens_<i) for every token, so perplexity can be read as a
function of how far the stream has gone (StreamingLLM, Fig. 3/5). Configurations:

* ``dense``  -- stock vLLM (policy off), the reference. Its prompt is cut at the
  model's ``max_model_len`` (8192 for SmolLM2-135M-Instruct): stock vLLM cannot go further.
* ``S<n>@<C>`` -- ``--kv-policy streaming-sink`` with ``n`` sink tokens and a KV budget of
  ``C`` token slots per request. ``S0@C`` is window attention alone (the baseline that
  collapses). The sink block is taken out of the window budget: ``W = C - ceil(n/bs)*bs``,
  so every configuration of one ``C`` holds exactly the same KV blocks (window-only
  attends the most tokens; see docs/streaming-perplexity.md).
* ``<config>:<kv-cache-dtype>`` -- the same with vLLM's ``--kv-cache-dtype`` (``S4@1024:fp8_e4m3``,
  ``dense:fp8_e5m2``): an fp8 KV cache under the policy ([fp8-kv-cache.md](../docs/fp8-kv-cache.md)).

    .venv/bin/python benchmarks/streaming_perplexity.py                      # 32768 tokens, all configs
    .venv/bin/python benchmarks/streaming_perplexity.py --tokens 16384 --configs dense,S0@1024,S4@1024
    .venv/bin/python benchmarks/streaming_perplexity.py --resume             # keep finished configs of --out
    .venv/bin/python benchmarks/streaming_perplexity.py --model gemma3-270m --tokens 8192 \
        --configs dense,S0@1024,S1@1024,S4@1024 --out docs/streaming-perplexity-gemma3.json \
        --plot docs/streaming-perplexity-gemma3.png                        # a second model

``--model`` is an HF folder or the key of a model ``streaming-sink-prepare`` builds
(``smollm2``, ``gemma3-270m``). The prepared SmolLM2 reads the corpus's SmolLM2 ids; any
other model tokenizes the same text with its own tokenizer (Gemma: ``<bos>`` first).

Writes ``--out`` (json: per-256-token NLL sums per configuration, wall times, settings)
after every configuration, ``--plot`` (png), and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

for _k, _v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_HOST_IP="127.0.0.1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

BUCKET = 256  # NLL is stored as sums over buckets of this many predicted tokens
MARKS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_CONFIGS = ("dense", "S0@1024", "S4@1024", "S0@2048", "S4@2048",
                   "S1@1024", "S2@1024", "S8@1024", "S1@2048", "S2@2048", "S8@2048")
DEFAULT_OUT = ROOT / "docs" / "streaming-perplexity.json"
DEFAULT_PLOT = ROOT / "docs" / "streaming-perplexity.png"


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """``sinks=None``: stock vLLM, dense attention (policy off)."""

    name: str
    sinks: int | None = None
    cache: int | None = None  # KV token slots per request: sink blocks + window
    kv_dtype: str | None = None  # vLLM's --kv-cache-dtype (None: auto, the model's dtype)

    @property
    def dense(self) -> bool:
        return self.sinks is None

    def window(self, block_size: int) -> int | None:
        """Window tokens: the cache budget minus the sink blocks (a multiple of the block size)."""
        if self.dense:
            return None
        if self.cache % block_size:
            raise ValueError(f"{self.name}: cache {self.cache} is not a multiple of --block-size {block_size}")
        window = self.cache - math.ceil(self.sinks / block_size) * block_size
        if window <= 0:
            raise ValueError(f"{self.name}: no room for a window after {self.sinks} sink tokens")
        return window

    def label(self, block_size: int) -> str:
        kv = f", KV {self.kv_dtype}" if self.kv_dtype else ""
        if self.dense:
            return f"dense (stock vLLM){kv}"
        if self.sinks == 0:
            return f"window only, W={self.window(block_size)}{kv}"
        return f"{self.sinks} sink{'s' if self.sinks > 1 else ''} + W={self.window(block_size)}{kv}"


def parse_config(text: str) -> Config:
    """``dense``, ``S<n>@<cache>`` (``n`` sinks), or ``window@<cache>`` (= ``S0@<cache>``),
    each optionally ``:<kv-cache-dtype>`` (e.g. ``S4@1024:fp8_e4m3``)."""
    text, _, kv = text.strip().partition(":")
    suffix = f":{kv}" if kv else ""
    if text == "dense":
        return Config("dense" + suffix, kv_dtype=kv or None)
    m = re.fullmatch(r"(?:S(\d+)|window)@(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad config {text!r}: use dense, S<sinks>@<cache> or window@<cache>"
                                         f" (each optionally :<kv-cache-dtype>)")
    sinks = int(m.group(1) or 0)
    return Config(f"S{sinks}@{m.group(2)}{suffix}", sinks, int(m.group(2)), kv or None)


# ---------------------------------------------------------------------------------------------
# the stream and the engine
# ---------------------------------------------------------------------------------------------


def load_stream(n_tokens: int, book: str | None = "emma", model: str | None = None) -> list[int]:
    """The first ``n_tokens`` SmolLM2 token ids of an Austen novel (``None``/"all": all six in order).

    ``model``: a folder that is not the prepared SmolLM2 tokenizes the same text with its own
    tokenizer, special tokens included (Gemma: ``<bos>`` first, as it is meant to be prompted)."""
    from streaming_sink_tools.prepare import MODEL_NAME, corpus_text, corpus_tokens

    if model is None or Path(model).name.startswith(MODEL_NAME):
        ids = corpus_tokens(None if book in (None, "all") else book)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        text = corpus_text(None if book in (None, "all") else book)
        ids = np.asarray(tok.backend_tokenizer.encode(text[: 8 * n_tokens], add_special_tokens=True).ids)
    if ids.size < n_tokens:
        raise SystemExit(f"{book} has only {ids.size} tokens; ask for fewer --tokens or --book all")
    return ids[:n_tokens].tolist()


def model_dtype(model: str) -> str:
    """The dtype the folder was prepared in (``dtype as prepared``), from its config.json."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")


def context_of(model: str) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"])


def set_threads(n: int | None) -> int:
    """Intra-op threads of this process's torch (the in-process engine's worker); returns the old count.

    Goes through ``torch._C`` because vLLM's CPU worker replaces ``torch.set_num_threads``
    with a no-op once an engine has started in this process.
    """
    import torch

    old = torch.get_num_threads()
    if n:
        torch._C.set_num_threads(int(n))  # the builtin behind torch.set_num_threads
    return old


def make_engine(model: str, cfg: Config, n_tokens: int, block_size: int = 32, chunk: int = 1024,
                dtype: str | None = None, eager: bool = True, **kwargs):
    """One vLLM engine for one configuration (in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0).

    ``chunk`` is ``max_num_batched_tokens``: the prefill chunk of the single long prompt.
    ``eager`` skips torch.compile (~10 s to start instead of ~80 s on 2 cores).
    """
    import vllm_sink  # noqa: F401  (LLM(kv_policy=...) keywords)
    from vllm import LLM

    args = dict(model=model, block_size=block_size, dtype=dtype or model_dtype(model), seed=0,
                max_num_batched_tokens=chunk, max_num_seqs=1, enable_prefix_caching=False,
                enforce_eager=eager)
    if cfg.kv_dtype:
        args.update(kv_cache_dtype=cfg.kv_dtype)
    if cfg.dense:
        args.update(max_model_len=context_of(model))
    else:
        args.update(kv_policy="streaming-sink", sink_tokens=cfg.sinks, sink_window=cfg.window(block_size),
                    max_model_len=n_tokens + 1)
    args.update(kwargs)
    return LLM(**args)


def max_prompt(llm) -> int:
    """Longest prompt the engine takes with one generated token."""
    return llm.llm_engine.vllm_config.model_config.max_model_len - 1


def token_nll(llm, ids: list[int], progress=None) -> np.ndarray:
    """``-log p(ids[i] | ids[:i])`` for ``i >= 1`` (float64), from the engine's prompt logprobs.

    Steps the engine itself so ``progress`` (a tqdm bar) follows the prefill chunk by chunk.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    rid = engine.add_request(f"stream-{time.monotonic_ns()}", {"prompt_token_ids": ids}, params)
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler  # in-process only
    except AttributeError:
        scheduler = None
    final, done = None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
        if progress is not None:
            now = len(ids) if final is not None else _computed(scheduler, done)
            progress.update(max(0, min(now, len(ids)) - done))
            done = max(done, min(now, len(ids)))
    if final is None:
        raise RuntimeError(f"request {rid} finished without output")
    plp = final.prompt_logprobs
    return -np.array([plp[i][ids[i]].logprob for i in range(1, len(ids))], dtype=np.float64)


def _computed(scheduler, fallback: int) -> int:
    if scheduler is None:
        return fallback
    return sum(r.num_computed_tokens for r in scheduler.requests.values()) or fallback


# ---------------------------------------------------------------------------------------------
# perplexity bookkeeping (predicted token i >= 1 falls in bucket i // BUCKET)
# ---------------------------------------------------------------------------------------------


def bucket_sums(nll: np.ndarray, bucket: int = BUCKET) -> tuple[list[float], list[int]]:
    """NLL sums and counts per bucket of absolute positions ``[b*bucket, (b+1)*bucket)``."""
    pos = np.arange(1, nll.size + 1)
    b = pos // bucket
    sums = [round(x, 4) for x in np.bincount(b, weights=nll).tolist()]
    counts = np.bincount(b).astype(int).tolist()
    return sums, counts


def ppl(result: dict, lo: int, hi: int) -> float | None:
    """Perplexity over predicted positions ``[lo, hi)`` (bucket-aligned), None if not all covered."""
    bucket, sums, counts = result["bucket"], result["nll_sums"], result["counts"]
    # The first N tokens hold N-1 predictions, so hi <= tokens. One token of slack lets the dense
    # reference's prompt (max_model_len - 1 = 8191 tokens) stand for "the first 8k".
    if lo % bucket or hi % bucket or hi > result["tokens"] + 1:
        return None
    s = sum(sums[lo // bucket:hi // bucket])
    n = sum(counts[lo // bucket:hi // bucket])
    return math.exp(s / n) if n else None


def cumulative_ppl(result: dict, n: int) -> float | None:
    """Perplexity of the first ``n`` tokens (tokens 1..n-1 predicted)."""
    return ppl(result, 0, n)


def run_config(model: str, cfg: Config, ids: list[int], block_size: int = 32, chunk: int = 1024,
               dtype: str | None = None, eager: bool = True, show_progress: bool = True) -> dict:
    """Build the engine, stream ``ids`` through it, drop the engine; the result record."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    llm = make_engine(model, cfg, len(ids), block_size=block_size, chunk=chunk, dtype=dtype, eager=eager)
    init_s = time.perf_counter() - t0
    try:
        prompt = ids[:max_prompt(llm)]
        with tqdm(total=len(prompt), desc=cfg.name, unit="tok", unit_scale=True, file=sys.stderr,
                  disable=not show_progress, dynamic_ncols=True) as bar:
            t1 = time.perf_counter()
            nll = token_nll(llm, prompt, progress=bar)
            run_s = time.perf_counter() - t1
        dtype = str(llm.llm_engine.vllm_config.model_config.dtype).replace("torch.", "")
    finally:
        del llm
        gc.collect()
    sums, counts = bucket_sums(nll)
    return {
        "config": cfg.name, "label": cfg.label(block_size), "sinks": cfg.sinks, "cache": cfg.cache,
        "kv_cache_dtype": cfg.kv_dtype or "auto",
        "window": cfg.window(block_size), "block_size": block_size, "chunk": chunk, "dtype": dtype,
        "tokens": len(prompt), "init_s": round(init_s, 1), "run_s": round(run_s, 1),
        "tokens_per_s": round(len(prompt) / run_s, 1), "ppl": math.exp(float(nll.mean())),
        "bucket": BUCKET, "nll_sums": sums, "counts": counts,
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def table(results: list[dict], tokens: int) -> str:
    marks = [m for m in MARKS if m <= tokens]
    head = f"{'config':<18}{'attention':<34}" + "".join(f"{f'@{m // 1024}k':>8}" for m in marks)
    lines = ["cumulative perplexity of the first N tokens", head]
    for r in results:
        cells = [cumulative_ppl(r, m) for m in marks]
        lines.append(f"{r['config']:<18}{r['label']:<34}" + "".join(
            f"{c:>8.2f}" if c is not None else f"{'-':>8}" for c in cells))
    lines += ["", "perplexity of the 1024 tokens ending at N", head]
    for r in results:
        cells = [ppl(r, m - 1024, m) for m in marks]
        lines.append(f"{r['config']:<18}{r['label']:<34}" + "".join(
            f"{c:>8.2f}" if c is not None else f"{'-':>8}" for c in cells))
    lines += ["", f"{'config':<18}{'tokens':>8}{'ppl':>9}{'run s':>9}{'tok/s':>8}{'init s':>8}"]
    for r in results:
        lines.append(f"{r['config']:<18}{r['tokens']:>8}{r['ppl']:>9.2f}{r['run_s']:>9.1f}"
                     f"{r['tokens_per_s']:>8.1f}{r['init_s']:>8.1f}")
    return "\n".join(lines)


def ablation(results: list[dict], lo: int = 8192) -> str:
    """Perplexity of the tokens past ``lo`` (beyond the model's context), sinks x cache size."""
    runs = [r for r in results if r["sinks"] is not None and r["tokens"] > lo + BUCKET]
    if not runs:
        return ""
    hi = min(r["tokens"] // BUCKET * BUCKET for r in runs)
    caches = sorted({r["cache"] for r in runs})
    lines = [f"perplexity of tokens [{lo}, {hi}) (past the model's context): sink-count ablation",
             f"{'sinks':<8}" + "".join(f"{f'cache {c}':>14}" for c in caches)]
    for n in sorted({r["sinks"] for r in runs}):
        cells = []
        for c in caches:
            r = next((r for r in runs if r["sinks"] == n and r["cache"] == c), None)
            v = ppl(r, lo, hi) if r else None
            cells.append(f"{v:>8.2f} W={r['window']:<4}" if v is not None else f"{'-':>14}")
        lines.append(f"{n:<8}" + "".join(cells))
    return "\n".join(lines)


def plot(results: list[dict], path: str | os.PathLike, context: int | None = None, smooth: int = 1024,
         title: str = "") -> None:
    """Log perplexity vs tokens processed, one panel per cache size (dense in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MultipleLocator, NullFormatter

    dense = [r for r in results if r["sinks"] is None]
    caches = sorted({r["cache"] for r in results if r["sinks"] is not None}) or [None]
    fig, axes = plt.subplots(1, len(caches), figsize=(6.2 * len(caches), 4.8), sharey=True, squeeze=False)
    colors = {0: "tab:red", 1: "tab:orange", 2: "tab:olive", 4: "tab:green", 8: "tab:blue"}
    widths = {0: 1.3, 1: 3.6, 2: 2.6, 4: 1.7, 8: 0.9}
    lo, hi, xmax = float("inf"), 0.0, 0
    for ax, cache in zip(axes[0], caches):
        group = dense + sorted((r for r in results if r["cache"] == cache and r["sinks"] is not None),
                               key=lambda r: r["sinks"])
        for r in group:
            x, y = _smoothed(r, smooth)
            lo, hi, xmax = min(lo, y.min()), max(hi, y.max()), max(xmax, int(x.max()))
            # Sink curves may coincide: thinner lines on top keep every one visible.
            style = dict(color="black", lw=2.0, ls="--", zorder=5) if r["sinks"] is None else \
                dict(color=colors.get(r["sinks"]), lw=widths.get(r["sinks"], 1.0),
                     ls=":" if r.get("kv_cache_dtype", "auto") != "auto" else "-")  # fp8 KV dotted
            ax.plot(x, y, label=r["label"], **style)
        ax.set_title(f"KV budget: {cache} token slots per request" if cache else "", fontsize=10)
        ax.set_xlabel("tokens processed (one prompt, teacher-forced)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", ncol=2)
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.08, hi * 1.7)  # headroom for the legend
        ticks = [t for t in (5, 10, 15, 20, 25, 30, 40, 50, 70, 100, 150, 200, 300, 500, 1000, 2000, 5000)
                 if lo / 1.1 <= t <= hi * 1.1]
        ax.set_yticks(ticks)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_locator(MultipleLocator(2 ** max(10, round(math.log2(max(xmax, 1024) / 8)))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}k"))
        if context and context < xmax:
            ax.axvline(context, color="grey", lw=0.8, ls=":")
            ax.text(context, 0.02, f" model context ({context // 1024}k): stock vLLM stops",
                    transform=ax.get_xaxis_transform(), va="bottom", ha="left", fontsize=7.5, color="grey")
    axes[0][0].set_ylabel(f"perplexity, log scale ({smooth}-token windows)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smoothed(r: dict, smooth: int) -> tuple[np.ndarray, np.ndarray]:
    """Perplexity of the ``smooth`` tokens ending at each bucket edge."""
    k = max(1, smooth // r["bucket"])
    sums, counts = np.cumsum([0.0, *r["nll_sums"]]), np.cumsum([0, *r["counts"]])
    ends = np.arange(k, len(r["nll_sums"]) + 1)
    ends = ends[ends * r["bucket"] <= r["tokens"]]
    y = np.exp((sums[ends] - sums[ends - k]) / (counts[ends] - counts[ends - k]))
    return ends * r["bucket"], y


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def report(results: list[dict], settings: dict, context: int, plot_path: str | None) -> None:
    """The plot (when ``plot_path``) and the printed tables."""
    if plot_path:
        plot(results, plot_path, context=context,
             title=f"{settings['model'].split('-bfloat16')[0].split('-float32')[0]} on Austen ({settings['book']}), "
                   f"vLLM {results[0].get('vllm', '')} + streaming-sink, block {settings['block_size']}, "
                   f"{results[0]['dtype']}")
    print(f"\n{settings['model']} (context {context}), {settings['book']}, {settings['tokens']} tokens, "
          f"block {settings['block_size']}, chunk {settings['chunk']}, {results[0]['dtype']}, "
          f"vLLM {results[0].get('vllm', '?')}")
    print(table(results, settings["tokens"]))
    if (text := ablation(results, lo=context)):
        print("\n" + text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768, help="stream length (default 32768)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma list of dense, S<sinks>@<cache>, window@<cache> (default: %(default)s)")
    ap.add_argument("--book", default="emma", help="Austen novel (emma, prideprejudice, ...) or 'all' (default emma)")
    ap.add_argument("--model", help="HF folder, or smollm2 / gemma3-270m: a model streaming-sink-prepare builds "
                                    "(default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", help="engine dtype (default: as the folder was prepared)")
    ap.add_argument("--block-size", type=int, default=32, help="KV block size (CPU: a multiple of 32; default 32)")
    ap.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens: prefill chunk (default 1024)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine the policy's many small "
                         "CPU attention ops stall on a busy second thread; 0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (default: eager)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results json (default docs/streaming-perplexity.json)")
    ap.add_argument("--plot", default=str(DEFAULT_PLOT), help="png to write ('' for none)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the configs already in --out that match these settings; run only the rest")
    ap.add_argument("--replot", action="store_true", help="no engine: redraw --plot and print the tables from --out")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the command line only: keep the progress bar readable
    if args.replot:
        data = json.loads(Path(args.out).read_text())
        report(data["results"], data["settings"], data["context"], args.plot)
        return 0
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    for c in configs:
        c.window(args.block_size)  # fail before any engine starts
    from streaming_sink_tools.prepare import default_model_path

    from streaming_sink_tools.prepare import MODELS

    model = default_model_path(model=args.model) if args.model in MODELS else (args.model or default_model_path())
    set_threads(args.threads)
    ids = load_stream(args.tokens, args.book, model)
    context = context_of(model)
    import vllm

    settings = {"model": Path(model).name, "book": args.book, "tokens": args.tokens, "block_size": args.block_size,
                "chunk": args.chunk, "dtype": args.dtype or model_dtype(model), "eager": not args.compile}
    done: dict[str, dict] = {}
    log: list[dict] = []
    if args.resume and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if {k: old.get("settings", {}).get(k) for k in settings} == settings:
            done = {r["config"]: r for r in old["results"]}
            log = old.get("invocations", [])
            print(f"resuming: {len(done)} finished config(s) in {args.out}: {', '.join(done)}", file=sys.stderr)
        else:
            print(f"--resume: {args.out} has other settings ({old.get('settings')}); starting over", file=sys.stderr)
    log.append({"command": "benchmarks/streaming_perplexity.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "ran": [], "wall_s": 0.0})

    t_start = time.perf_counter()
    for cfg in configs:
        if cfg.name in done:
            continue
        r = run_config(model, cfg, ids, args.block_size, args.chunk, args.dtype, eager=not args.compile)
        r["vllm"] = vllm.__version__
        done[cfg.name] = r
        log[-1]["ran"].append(cfg.name)
        log[-1]["wall_s"] = round(time.perf_counter() - t_start, 1)
        print(f"{cfg.name}: {r['tokens']} tokens, ppl {r['ppl']:.2f}, {r['run_s']:.0f} s "
              f"({r['tokens_per_s']:.0f} tok/s)", file=sys.stderr, flush=True)
        _save(args.out, settings, context, list(done.values()), log)
    log[-1]["wall_s"] = round(time.perf_counter() - t_start, 1)
    results = [done[c.name] for c in configs] + [r for n, r in done.items() if n not in {c.name for c in configs}]
    _save(args.out, settings, context, results, log)
    report(results, settings, context, args.plot)
    return 0


def _save(path, settings: dict, context: int, results: list[dict], log: list[dict]) -> None:
    if not path:
        return
    import torch

    data = {
        "settings": settings, "context": context,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
                   f"load average at save {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "invocations": log,
        "results": results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
