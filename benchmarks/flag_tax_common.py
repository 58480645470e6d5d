"""What the two flag-tax benchmarks share: bench_flag_tax.py (vLLM) and bench_flag_tax_sglang.py (SGLang).

The run and row records, the A B A B run order with its seeded prompts, the medians and ratios
of the table, its printing and the JSON file: one copy, so both tables measure and read alike.
No engine imports, and torch / tqdm only inside the functions that use them: both venvs import
this, and so do SGLang's spawned subprocesses (they re-run the script's top level).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCK = 0  # engine key of the stock engine; policy engines are keyed by their window


@dataclasses.dataclass(frozen=True)
class Run:
    engine: int | str  # STOCK, a policy window, or "hf" (vLLM's HF reference)
    batch: int
    prompt: int
    new: int
    measure: str = "decode"  # or "prefill" (max new tokens 1)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    a: str  # run names of the case
    b: str
    same_outputs: bool = False  # dense regime on both sides: greedy tokens must match
    a_name: str = ""  # shown instead of the engine's name
    b_name: str = ""
    measure: str = ""  # the runs' own measure unless given (e.g. the prefill phase of decode runs)


Cases = dict[str, tuple[dict[str, Run], list[Row]]]


def engine_name(key: int | str) -> str:
    return {STOCK: "stock", "hf": "HF attention-sinks"}.get(key, f"sink W={key}")


def dense_cases(z) -> Cases:
    """Cases 1-3 of both tables, the policy at ``z.dense_window`` (dense regime) vs stock: decode at
    batch 1 and ``z.batch`` (greedy tokens must match), prefill of ``z.batch`` prompts."""
    dw = z.dense_window
    dense1 = Run(dw, 1, z.short_prompt, z.dense_new)
    dense_b = dataclasses.replace(dense1, batch=z.batch)
    pre = Run(dw, z.batch, z.short_prompt, 1, "prefill")
    return {
        "1": ({"sink": dense1, "stock": dataclasses.replace(dense1, engine=STOCK)},
              [Row(f"b=1, {z.short_prompt}+{z.dense_new} tokens, dense (W={dw})", "sink", "stock", True)]),
        "2": ({"sink": dense_b, "stock": dataclasses.replace(dense_b, engine=STOCK)},
              [Row(f"b={z.batch}, {z.short_prompt}+{z.dense_new} tokens, dense (W={dw})", "sink", "stock",
                   True)]),
        "3": ({"sink": pre, "stock": dataclasses.replace(pre, engine=STOCK)},
              [Row(f"{z.batch} x {z.short_prompt} tokens (W={dw})", "sink", "stock")]),
    }


def tiny_model() -> str:
    """The tiny random Llama of tests/tiny_models.py (4096 positions), built in a temporary folder."""
    sys.path.insert(1, os.path.join(ROOT, "tests"))  # not first: the SGLang script keeps its CPU stand-in there
    from tiny_models import build_tiny_llama

    return build_tiny_llama(os.path.join(tempfile.mkdtemp(), "tiny4k"), max_position_embeddings=4096)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Seeded token ids in [3, min(vocab, 32000)): no special ids at the bottom."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 32000), (n, length), generator=g).tolist()


def run_all(cases: Cases, repeats: int, vocab: int,
            run_one: Callable[[Run, list[list[int]], str], dict]) -> tuple[dict[str, dict[str, list[dict]]], float]:
    """Every run of every case ``repeats`` times, alternating within a case (A B A B ...) so machine noise
    hits both sides alike; ``run_one(spec, prompts, tag)`` runs one on its engine. The runs of one
    repeat get the same prompts (shorter ones are prefixes). Returns the raw results and the seconds."""
    from tqdm import tqdm

    raw: dict[str, dict[str, list[dict]]] = {c: {name: [] for name in runs} for c, (runs, _) in cases.items()}
    total = sum(len(runs) for runs, _ in cases.values()) * repeats
    t0 = time.perf_counter()
    with tqdm(total=total, desc="runs", file=sys.stderr) as bar:
        for c, (runs, _) in cases.items():
            for rep in range(repeats):
                for name, spec in runs.items():
                    bar.set_postfix_str(f"case {c} {name} rep {rep}")
                    prompts = random_prompts(spec.batch, max(r.prompt for r in runs.values()), vocab,
                                             seed=1000 * int(c) + rep)
                    res = run_one(spec, [p[:spec.prompt] for p in prompts], f"c{c}-{name}-{rep}")
                    res["load_avg"] = os.getloadavg()[0]
                    raw[c][name].append(res)
                    bar.update()
    return raw, time.perf_counter() - t0


# ---- the table ---------------------------------------------------------------------------------

def rate(r: dict, measure: str, clock: str) -> float:
    return r[f"{measure}_tokens"] / r[f"{measure}_{clock}"]


def med(xs) -> float:
    return statistics.median(xs)


def fmt(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def table_rows(cases: Cases, raw: dict[str, dict[str, list[dict]]],
               side_extra: Callable[[list[dict], str], dict]) -> list[dict]:
    """One dict a row: medians of each side, A / B ratios, same greedy tokens (repeat 0) where they
    must match. ``side_extra(results, measure)`` adds an engine's own figures to each side."""
    table = []
    for c, (runs, rows) in cases.items():
        for row in rows:
            measure = row.measure or runs[row.a].measure
            ra, rb = raw[c][row.a], raw[c][row.b]
            e = dict(case=c, label=row.label, measure=measure, a=row.a_name or engine_name(runs[row.a].engine),
                     b=row.b_name or engine_name(runs[row.b].engine))
            for side, rs in (("a", ra), ("b", rb)):
                e[f"{side}_tok_per_cpu_s"] = med(rate(r, measure, "cpu") for r in rs)
                e[f"{side}_tok_per_s"] = med(rate(r, measure, "wall") for r in rs)
                e[f"{side}_cpu_s"] = med(r[f"{measure}_cpu"] for r in rs)
                e[f"{side}_wall_s"] = med(r[f"{measure}_wall"] for r in rs)
                e.update({f"{side}_{k}": v for k, v in side_extra(rs, measure).items()})
            e["ratio_cpu"] = e["a_tok_per_cpu_s"] / e["b_tok_per_cpu_s"]
            e["ratio_wall"] = e["a_tok_per_s"] / e["b_tok_per_s"]
            if row.same_outputs:
                e["same_outputs"] = sum(x == y for x, y in zip(ra[0]["outputs"], rb[0]["outputs"]))
                e["requests"] = len(ra[0]["outputs"])
            table.append(e)
    return table


def print_table(table: list[dict], extra: tuple[tuple[str, Callable[[dict], str]], ...] = ()) -> None:
    """The markdown table; ``extra`` = (header, cell of a row) columns an engine adds before "same tokens"."""
    heads = ["case", "what", "A", "B", "tok/CPU-s A / B", "ratio", "wall tok/s A / B", "ratio", "CPU s A / B",
             "wall s A / B", *(h for h, _ in extra), "same tokens"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for e in table:
        cells = [e["case"], f"{e['measure']}: {e['label']}", e["a"], e["b"],
                 f"{fmt(e['a_tok_per_cpu_s'])} / {fmt(e['b_tok_per_cpu_s'])}", f"{e['ratio_cpu']:.2f}",
                 f"{fmt(e['a_tok_per_s'])} / {fmt(e['b_tok_per_s'])}", f"{e['ratio_wall']:.2f}",
                 f"{e['a_cpu_s']:.3g} / {e['b_cpu_s']:.3g}", f"{e['a_wall_s']:.3g} / {e['b_wall_s']:.3g}",
                 *(cell(e) for _, cell in extra),
                 f"{e['same_outputs']}/{e['requests']}" if "same_outputs" in e else ""]
        print("| " + " | ".join(map(str, cells)) + " |")


def write_json(path: str, settings: dict, sizes, cases: Cases, table: list[dict],
               raw: dict[str, dict[str, list[dict]]], **more) -> None:
    """Every raw figure; ``more`` (startup seconds, run seconds, ...) goes between sizes and cases."""
    for c in raw.values():
        for rs in c.values():
            for r in rs:
                r.pop("outputs", None)  # token ids: only the same-tokens column needs them
    json.dump(dict(settings=settings, sizes=dataclasses.asdict(sizes), **more,
                   cases={c: {n: dataclasses.asdict(s) for n, s in runs.items()} for c, (runs, _) in cases.items()},
                   rows=table, raw=raw), open(path, "w"), indent=1)
    print(f"raw figures: {path}")
