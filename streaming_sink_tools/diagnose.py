"""Measure a model's attention sinks, engine-free, and recommend ``--sink-tokens``.

``diagnose(model, text, ...)`` runs a Hugging Face causal LM (eager attention, on CPU)
over a few windows of a text and reads every layer's attention weights through forward
hooks, reducing each layer's ``(heads, T, T)`` matrix to per-head figures at once (the
matrices of a whole model would not fit in memory at T = 2048). What it reports, per
layer and head, with the papers' definitions (docs/diagnose.md cites them):

* **first-token share** ``alpha_0 = mean_{i >= 0} A[i, 0]``: the importance score of the
  first token (Gu et al., ICLR 2025, Sec. 3.2); the "attention on the first token" of
  Gated Attention (Qiu et al., 2025). Averaged over samples.
* **first-k share** ``mean_{i >= k} sum_{j < k} A[i, j]`` for k = 1, 2, 4, 8, 16: the mass
  that k sink tokens would keep (queries inside the prefix are left out: they trivially
  put all their mass there).
* **sink rate** (Gu et al.): the share, in percent, of (sample, layer, head) with
  ``alpha_0 > eps`` (eps = 0.3 by default, the paper's choice); also at T = 64, the
  length of the paper's tables (exact from the same pass: attention is causal, so the
  first 64 queries of a window see what a 64-token input would). The same test on
  ``alpha_j = mean_{i >= j} A[i, j]`` finds sinks at positions j = 1..15 too.
* **recommended sink tokens**: the fewest first positions holding ``mass`` (0.9) of the
  sink mass (the ``alpha_j`` above eps) of the first 16; 0 when fewer than ``min_rate``
  percent of (sample, layer, head) have a sink there at all.
* **dormant heads** (Sandoval-Segura et al., 2025): sink heads (``alpha_0 > eps``) whose
  mean output norm before the output projection is below ``tau`` times the mean of the
  layer's heads.
* **learned sink share**, for models with learned sink logits (GPT-OSS ``sinks``): the
  softmax mass the sink logit takes (``1 - sum_j A[i, j]``), mean over queries.

In a sliding-window layer (Gemma 3, GPT-OSS) only queries whose window still holds
position 0 can attend it; the means above run over those queries.

Imports neither vLLM nor SGLang; torch and transformers only inside the functions.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PREFIX_KS = (1, 2, 4, 8, 16)  # first-k shares reported
K_MAX = max(PREFIX_KS)
SHORT_T = 64  # Gu et al. compare models at T = 64
DEFAULTS = dict(samples=8, length=2048, eps=0.3, tau=0.5, mass=0.9, min_rate=1.0)


class DiagnoseError(RuntimeError):
    """Bad input (not a model, no attention weights, text too short): a one-line message."""


# ---------------------------------------------------------------------------------------------
# the figures, from attention weights (pure functions: the tests check them by hand)
# ---------------------------------------------------------------------------------------------


def head_figures(attn, window: int | None = None, k_max: int = K_MAX, short_t: int = SHORT_T,
                 rowsum: bool = True) -> dict:
    """Per-head figures of one layer and one sample; ``attn`` is ``(H, T, T)`` (rows sum to <= 1).

    Returns float64 numpy arrays (NaN where a window is too short to say):

    * ``alpha`` (H, k_max): Gu et al.'s importance score of key j, ``mean_{i >= j} A[i, j]``
      over the queries that see key j; column 0 is ``alpha_0``, the first-token share;
    * ``alpha0_short`` (H,): ``alpha_0`` over the first ``short_t`` queries only;
    * ``prefix`` (H, k_max): column k-1 is the mass on keys [0, k), mean over queries i >= k;
    * ``learned_sink`` (H,): ``1 - row sum``, mean over queries: the mass a learned sink
      logit took (None unless ``rowsum``).

    ``window``: a sliding window (query i sees key j iff i - j < window); None = full causal.
    """
    import torch

    attn = attn.detach()
    H, T, _ = attn.shape
    k = min(k_max, T)
    # Slices only: the (H, T, T) matrix is never copied.
    cols = attn[:, :, :k].to(torch.float64)  # (H, T, k)
    i = torch.arange(T).unsqueeze(1)
    j = torch.arange(k).unsqueeze(0)
    sees = (i >= j) & ((i - j < window) if window else True)  # (T, k): query i sees key j
    n = sees.sum(0)
    alpha = torch.full((H, k_max), float("nan"), dtype=torch.float64)
    alpha[:, :k] = (cols * sees).sum(1) / n.clamp(min=1)
    cum = cols.cumsum(-1)  # mass on keys [0, k')
    prefix = torch.full((H, k_max), float("nan"), dtype=torch.float64)
    for kk in range(1, k + 1):
        rows = (torch.arange(T) >= kk) & (torch.arange(T) < (window or T))
        if rows.any():
            prefix[:, kk - 1] = cum[:, rows, kk - 1].mean(-1)
    seen0 = sees[:, 0]
    return {
        "alpha": alpha.numpy(),
        "alpha0_short": cols[:, :short_t, 0][:, seen0[:short_t]].mean(-1).numpy(),
        "prefix": prefix.numpy(),
        "learned_sink": (1.0 - attn.sum(-1, dtype=torch.float64)).mean(-1).numpy() if rowsum else None,
    }


def sink_rate_percent(alpha0, eps: float) -> float:
    """Gu et al.'s Sink_1^eps in percent: share of entries (sample, layer, head) with alpha_0 > eps."""
    a = np.asarray(alpha0, dtype=np.float64)
    return float(100.0 * np.mean(a > eps)) if a.size else 0.0


def recommend(alpha, eps: float, mass: float, min_rate: float, learned_sink: float | None = None) -> dict:
    """The sink-token count, from Gu et al.'s scores ``alpha`` of shape (samples, layers, heads, K).

    A head has a sink at position j when ``alpha_j > eps`` (Gu et al.). The sink mass at j is
    the sum of those scores; the recommendation is the smallest k whose positions [0, k) hold
    ``mass`` of the sink mass of the first K positions. A model with sinks in fewer than
    ``min_rate`` percent of (sample, layer, head) needs none (learned sinks, gated attention,
    or no sink at all). Attention below eps (ordinary reading of early tokens) is not sink mass.
    """
    a = np.nan_to_num(np.asarray(alpha, dtype=np.float64), nan=0.0)
    sink = a > eps
    by_pos = (a * sink).reshape(-1, a.shape[-1]).mean(0)  # sink mass at j, mean per (sample, layer, head)
    rate_by_pos = 100.0 * sink.reshape(-1, a.shape[-1]).mean(0)
    any_rate = 100.0 * float(sink.any(-1).mean())
    out = {"sink_mass_by_position": by_pos, "sink_rate_by_position_percent": rate_by_pos,
           "sink_rate_any_position_percent": any_rate}
    if any_rate < min_rate or by_pos.sum() <= 0:
        why = (f"sinks in {any_rate:.1f}% < {min_rate:g}% of (sample, layer, head): attention does not lean "
               f"on the first tokens")
        if learned_sink is not None:
            why += f" (the learned sink logits take {100 * learned_sink:.1f}% of it)"
        return {**out, "recommended_sink_tokens": 0, "needs_sink_tokens": False,
                "recommendation": why + "; --sink-tokens 0 (plain window attention) loses no sink"}
    cum = np.cumsum(by_pos) / by_pos.sum()
    k = int(np.argmax(cum >= mass - 1e-12)) + 1
    where = ", ".join(f"j={j}: {rate_by_pos[j]:.1f}%" for j in range(len(by_pos)) if rate_by_pos[j] > 0)
    why = (f"positions [0, {k}) hold {100 * cum[k - 1]:.1f}% (>= {100 * mass:g}%) of the sink mass of the "
           f"first {len(by_pos)}; heads with a sink at j: {where}")
    return {**out, "recommended_sink_tokens": k, "needs_sink_tokens": True, "recommendation": why}


# ---------------------------------------------------------------------------------------------
# model, text, samples
# ---------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def model_location(path: Path) -> tuple[Path, dict]:
    """(folder, from_pretrained keywords) of an HF folder or a ``.gguf`` file; checked before any import."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}  # transformers dequantizes it on load
    if path.is_dir() and (path / "config.json").is_file():
        return path, {}
    raise DiagnoseError(f"{path} is not a model: expected a Hugging Face folder with config.json, or a .gguf file")


def load_model(path: str | os.PathLike, dtype: str = "float32", quiet: bool = False):
    """(model, tokenizer) from an HF folder or a ``.gguf`` file, eager attention, eval mode."""
    from transformers.utils import logging as hf_logging

    path = Path(path).expanduser()
    folder, kw = model_location(path)
    if not quiet:
        return _load(path, folder, kw, dtype)
    # No loader bars or warnings: the caller's output is all there is. Restored afterwards.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return _load(path, folder, kw, dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load(path: Path, folder: Path, kw: dict, dtype: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder), **kw)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one line
        raise DiagnoseError(f"{path}: cannot read the model config ({_first_line(err)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), attn_implementation="eager", dtype=getattr(torch, dtype), **kw)
    except Exception as err:  # noqa: BLE001
        msg = _first_line(err)
        if "eager" in msg or "attn_implementation" in msg:
            raise DiagnoseError(
                f"{path}: attention weights cannot be obtained: this model has no eager attention ({msg})") from None
        kind = getattr(config, "model_type", "?")
        raise DiagnoseError(f"{path}: cannot load {kind} as a causal LM ({msg})") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception as err:  # noqa: BLE001
        raise DiagnoseError(f"{path}: no usable tokenizer ({_first_line(err)})") from None
    return model.eval(), tok


def _encode(tok, text: str) -> list[int]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # Rust tokenizer directly: fast, and no max-length warning
        return backend.encode(text, add_special_tokens=False).ids
    return tok(text, add_special_tokens=False)["input_ids"]


def special_prefix(tok, bos: str = "auto") -> list[int]:
    """Ids the tokenizer puts before any text (e.g. ``<s>``); ``bos`` = auto | yes | no."""
    if bos == "no":
        return []
    with_special = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    prefix = list(with_special[:n]) if n > 0 and with_special[n:] == plain else []
    if bos == "yes" and not prefix:
        if tok.bos_token_id is None:
            raise DiagnoseError("--bos yes: the tokenizer has no BOS token")
        prefix = [tok.bos_token_id]
    return prefix


def token_windows(ids: list[int], prefix: list[int], samples: int, length: int) -> list[list[int]]:
    """``samples`` windows of ``length`` tokens (prefix + text), evenly spaced over the text."""
    need = length - len(prefix)
    if need < 1 or len(ids) < need:
        raise DiagnoseError(
            f"the text has {len(ids)} tokens; --length {length} needs {max(need, 1)}"
            + (f" (plus {len(prefix)} special)" if prefix else "") + ": give a longer text or a smaller --length")
    starts = np.linspace(0, len(ids) - need, samples).round().astype(int) if samples > 1 else [0]
    return [prefix + ids[s : s + need] for s in starts]


def read_text(text: str | None = None, text_file: str | os.PathLike | None = None,
              corpus: str | None = None) -> tuple[str, str]:
    """(text, where it came from)."""
    if text is not None:
        return text, "text"
    if text_file is not None:
        p = Path(text_file).expanduser()
        try:
            return p.read_text(encoding="utf-8", errors="replace"), str(p)
        except OSError as err:
            raise DiagnoseError(f"--text {p}: {err.strerror or err}") from None
    if corpus == "austen":
        from streaming_sink_tools import prepare

        try:
            return prepare.corpus_text(None, prepare=True), "austen (six novels, r-cran-janeaustenr)"
        except prepare.AssetError as err:
            raise DiagnoseError(str(err).splitlines()[0]) from None
    raise DiagnoseError("give --text FILE or --corpus austen")


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    index: int
    module: object
    window: int | None
    has_sinks: bool
    figs: list = field(default_factory=list)  # one head_figures dict per sample
    norms: list = field(default_factory=list)  # (H,) mean output norm per sample


def attention_layers(model) -> list[_Layer]:
    """The self-attention modules, in layer order: those with an ``o_proj`` and a ``layer_idx``."""
    found = []
    for name, m in model.named_modules():
        if hasattr(m, "o_proj") and "attention" in type(m).__name__.lower() and hasattr(m, "layer_idx"):
            window = getattr(m, "sliding_window", None)
            found.append(_Layer(int(m.layer_idx), m, int(window) if window else None, hasattr(m, "sinks")))
    return sorted(found, key=lambda l: l.index)


def _run(model, windows, layers, heads: int, on_layer=None) -> None:
    """One forward pass per window; the hooks fill each layer's ``figs`` and ``norms``."""
    import torch

    def attn_hook(layer):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise DiagnoseError(
                    f"attention weights cannot be obtained: layer {layer.index} ({type(module).__name__}) "
                    "returned none with attn_implementation='eager'")
            layer.figs.append(head_figures(weights[0], layer.window, rowsum=layer.has_sinks))
            if on_layer:
                on_layer()
        return hook

    def oproj_hook(layer):
        def hook(module, args):
            x = args[0][0]  # (T, H*D): per-head outputs before the output projection
            norms = x.reshape(x.shape[0], heads, -1).float().norm(dim=-1)  # (T, H)
            layer.norms.append(norms[1:].mean(0).double().numpy())  # token 0 only copies its value
        return hook

    handles = []
    for layer in layers:
        handles.append(layer.module.register_forward_hook(attn_hook(layer)))
        handles.append(layer.module.o_proj.register_forward_pre_hook(oproj_hook(layer)))
    try:
        base = model.base_model  # no LM head: Gemma's 262k-vocab logits would cost GBs
        with torch.inference_mode():
            for w in windows:
                base(input_ids=torch.tensor([w]), use_cache=False)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# the whole diagnosis
# ---------------------------------------------------------------------------------------------


def diagnose(model_path, text: str | None = None, text_file=None, corpus: str | None = None,
             samples: int = DEFAULTS["samples"], length: int = DEFAULTS["length"], eps: float = DEFAULTS["eps"],
             tau: float = DEFAULTS["tau"], mass: float = DEFAULTS["mass"], min_rate: float = DEFAULTS["min_rate"],
             bos: str = "auto", dtype: str = "float32", progress: bool = False, model=None, tokenizer=None) -> dict:
    """Every figure as a JSON-ready dict (the keys of ``sinks.json``; docs/diagnose.md)."""
    t0 = time.time()
    if samples < 1 or length < 2:
        raise DiagnoseError("--samples must be >= 1 and --length >= 2")
    if model is None:
        model_location(Path(model_path).expanduser())  # a bad path fails before torch is imported
    raw, source = read_text(text, text_file, corpus)
    import torch
    import transformers
    if model is None:
        model, tokenizer = load_model(model_path, dtype, quiet=not progress)
    layers = attention_layers(model)
    if not layers:
        raise DiagnoseError(f"{model_path}: attention weights cannot be obtained: no self-attention layers found "
                            f"in {type(model).__name__}")
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise DiagnoseError(f"{model_path}: attention weights cannot be obtained: attention runs "
                            f"{model.config._attn_implementation!r}, not 'eager'")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(cfg.num_attention_heads)
    prefix = special_prefix(tokenizer, bos)
    windows = token_windows(_encode(tokenizer, raw), prefix, samples, length)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows) * len(layers), desc="diagnose", unit="layer", smoothing=0.1)
    try:
        _run(model, windows, layers, heads, on_layer=bar.update if bar else None)
    finally:
        if bar:
            bar.close()

    S = len(windows)
    alpha_k = np.stack([[l.figs[s]["alpha"] for l in layers] for s in range(S)])  # (S, L, H, K)
    alpha = alpha_k[..., 0]  # (S, L, H): the first-token share per sample
    alpha_short = np.stack([[l.figs[s]["alpha0_short"] for l in layers] for s in range(S)])
    prefix_sh = np.stack([[l.figs[s]["prefix"] for l in layers] for s in range(S)])  # (S, L, H, K)
    norms = np.stack([[l.norms[s] for l in layers] for s in range(S)])
    first = alpha.mean(0)  # (L, H)
    prefix_mean = prefix_sh.mean(0)  # (L, H, K)
    norm_mean = norms.mean(0)
    ratio = norm_mean / np.maximum(norm_mean.mean(-1, keepdims=True), 1e-30)
    dormant = [[int(l.index), int(h)] for li, l in enumerate(layers) for h in range(heads)
               if first[li, h] > eps and ratio[li, h] < tau]
    learned = None
    if any(l.has_sinks for l in layers):
        learned = [[float(v) for v in np.mean([f["learned_sink"] for f in l.figs], 0)] if l.has_sinks else None
                   for l in layers]
    learned_mean = float(np.mean([v for row in learned if row for v in row])) if learned else None
    rate = sink_rate_percent(alpha, eps)
    rec = recommend(alpha_k, eps, mass, min_rate, learned_mean)

    def r(x, nd=6):
        return None if x is None or not np.isfinite(x) else round(float(x), nd)

    return {
        "model": str(model_path),
        "model_type": getattr(cfg, "model_type", None),
        "samples": len(windows),
        "length": length,
        "source": source,
        "special_prefix": prefix,
        "eps": eps,
        "first_token_share": [[r(v) for v in row] for row in first],
        "first_k_share": {str(k): [[r(v) for v in row] for row in prefix_mean[:, :, k - 1]] for k in PREFIX_KS},
        "first_k_mass": [r(v) for v in np.nanmean(prefix_mean, axis=(0, 1))],
        "sink_mass_by_position": [r(v) for v in rec["sink_mass_by_position"]],
        "sink_rate_by_position_percent": [round(float(v), 2) for v in rec["sink_rate_by_position_percent"]],
        "sink_rate_any_position_percent": round(rec["sink_rate_any_position_percent"], 2),
        "sink_rate_percent": round(rate, 2),
        "sink_rate_percent_t64": round(sink_rate_percent(alpha_short, eps), 2) if length >= SHORT_T else None,
        "sink_rate_per_layer_percent": [round(100 * float(np.mean(alpha[:, li] > eps)), 2)
                                        for li in range(len(layers))],
        "mean_first_token_share": r(first.mean()),
        "layers": [l.index for l in layers],
        "layer_windows": [l.window for l in layers],
        "heads": heads,
        "head_output_norm_ratio": [[r(v, 3) for v in row] for row in ratio],
        "dormant_tau": tau,
        "dormant_heads": dormant,
        "dormant_share_percent": round(100 * len(dormant) / (len(layers) * heads), 2),
        "learned_sink_share": [[r(v) for v in row] if row else None for row in learned] if learned else None,
        "mass_share": mass,
        "min_sink_rate_percent": min_rate,
        "needs_sink_tokens": rec["needs_sink_tokens"],
        "recommended_sink_tokens": rec["recommended_sink_tokens"],
        "recommendation": rec["recommendation"],
        "dtype": dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "seconds": round(time.time() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------
# output: terminal table, picture
# ---------------------------------------------------------------------------------------------


def format_table(res: dict) -> str:
    """One row per layer, then the model-wide figures and the recommendation."""
    H = res["heads"]
    first = np.asarray(res["first_token_share"], dtype=float)
    k4 = np.asarray(res["first_k_share"]["4"], dtype=float)
    dormant = {}
    for l, h in res["dormant_heads"]:
        dormant.setdefault(l, []).append(h)
    lines = [f"{'layer':>5} {'window':>6} {'first-token':>11} {'max head':>12} {'first-4':>7} "
             f"{'sink heads':>10} {'dormant':>8}"]
    for li, layer in enumerate(res["layers"]):
        row = first[li]
        h = int(np.nanargmax(row))
        sinks = round(res["sink_rate_per_layer_percent"][li] * H / 100)  # heads, averaged over samples
        win = res["layer_windows"][li]
        lines.append(
            f"{layer:>5} {win if win else 'full':>6} {np.nanmean(row):>11.3f} {f'{row[h]:.3f} (h{h})':>12} "
            f"{np.nanmean(k4[li]):>7.3f} {f'{sinks}/{H}':>10} {','.join(map(str, dormant.get(layer, []))) or '-':>8}")
    lines.append("")
    t64 = res["sink_rate_percent_t64"]
    lines.append(f"sink rate (alpha_0 > {res['eps']:g}): {res['sink_rate_percent']:.1f}% of (sample, layer, head) "
                 f"at T={res['length']}" + (f", {t64:.1f}% at T=64" if t64 is not None else ""))
    lines.append(f"mean first-token share: {res['mean_first_token_share']:.3f}; attention on the first k tokens: "
                 + ", ".join(f"k={k}: {res['first_k_mass'][k - 1]:.3f}" for k in PREFIX_KS
                             if res['first_k_mass'][k - 1] is not None))
    lines.append(f"dormant heads (sink and output norm < {res['dormant_tau']:g} x layer mean): "
                 f"{len(res['dormant_heads'])} ({res['dormant_share_percent']:.1f}%)")
    if res["learned_sink_share"]:
        vals = [v for row in res["learned_sink_share"] if row for v in row]
        lines.append(f"learned sink logits: mean share {np.mean(vals):.3f} (max {np.max(vals):.3f})")
    lines.append(f"recommended --sink-tokens {res['recommended_sink_tokens']}: {res['recommendation']}")
    return "\n".join(lines)


def plot(res: dict, path: str | os.PathLike) -> None:
    """Layer x head heatmap of the first-token share, and the per-layer curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = np.asarray(res["first_token_share"], dtype=float)
    L, H = first.shape
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.16 * L + 1.5)),
                                   gridspec_kw={"width_ratios": [max(1.0, H / 6), 2.2]})
    im = ax0.imshow(first, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    for l, h in res["dormant_heads"]:
        ax0.plot(h, res["layers"].index(l), "w.", ms=4)
    ax0.set_xlabel("head")
    ax0.set_ylabel("layer (s: sliding window)")
    step = 1 if L <= 32 else max(1, L // 16)
    windows = res["layer_windows"]
    ax0.set_yticks(range(0, L, step))
    ax0.set_yticklabels([f"{res['layers'][i]}{'s' if windows[i] else ''}" for i in range(0, L, step)], fontsize=7)
    ax0.set_xticks(range(H))
    ax0.set_title("first-token share (white dot: dormant)", fontsize=9)
    fig.colorbar(im, ax=ax0, fraction=0.08)
    x = res["layers"]
    for i, w in enumerate(windows):  # sliding layers see token 0 only from their first `w` queries
        if w:
            ax1.axvspan(x[i] - 0.5, x[i] + 0.5, color="0.92", lw=0)
    ax1.plot(x, np.nanmean(first, 1), "o-", ms=3, label="first-token share (mean over heads)")
    ax1.plot(x, np.nanmean(np.asarray(res["first_k_share"]["4"], dtype=float), 1), "s--", ms=3,
             label="first-4 share")
    ax1.plot(x, np.asarray(res["sink_rate_per_layer_percent"]) / 100, "^:", ms=3,
             label=f"share of heads with alpha_0 > {res['eps']:g}")
    ax1.axhline(res["eps"], color="gray", lw=0.8, ls=":")
    ax1.set_ylim(0, 1.02)
    ax1.set_xlabel("layer")
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="best")
    name = f"{Path(str(res['model'])).name} ({res.get('model_type')})"
    ax1.set_title("per layer" + (" (gray: sliding-window layers)" if any(windows) else ""), fontsize=9)
    fig.suptitle(f"{name}: {res['samples']} x {res['length']} tokens, sink rate {res['sink_rate_percent']:.1f}% "
                 f"(eps {res['eps']:g}), recommended --sink-tokens {res['recommended_sink_tokens']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)


def uniform_alpha0(T: int) -> float:
    """alpha_0 of uniform causal attention over T tokens, mean_i 1/(i+1): the no-sink floor."""
    return sum(1.0 / (i + 1) for i in range(T)) / T if T > 0 else math.nan
