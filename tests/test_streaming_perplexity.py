"""A real model through the real engine: attention sinks keep perplexity, window attention alone does not.

SmolLM2-135M-Instruct (the prepared bf16 folder) on the first 4096 tokens of *Emma*,
teacher-forced through vLLM's prompt logprobs with chunked prefill, using the
functions of benchmarks/streaming_perplexity.py. KV budget 288 token slots per
request (block 32): 4 sinks + a 256-token window, or a 288-token window alone.
A mask emulation of the same setting (docs/streaming-perplexity.md) gave
dense 22.2, window-only 46.8, 4 sinks + 256 window 25.1.

~2 min on 2 idle CPU cores, ~3.5 min on a busy one (one torch thread: see the benchmark's --threads).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("streaming_perplexity", ROOT / "benchmarks" / "streaming_perplexity.py")
sp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("streaming_perplexity", sp)
_spec.loader.exec_module(sp)

from assets import require_asset  # noqa: E402
from streaming_sink.policy import SinkPolicy  # noqa: E402

TOKENS = 4096
BLOCK = 32
SINKS4, WINDOW_ONLY = sp.parse_config("S4@288"), sp.parse_config("S0@288")  # W=256 and W=288


def _assets() -> str:
    from streaming_sink_tools import prepare as P

    model = require_asset("the prepared SmolLM2 folder", lambda: P.default_model_path(prepare=True))
    require_asset("the Austen corpus", lambda: P.corpus_info(prepare=True))
    return model


@pytest.fixture(scope="module")
def model() -> str:
    path = _assets()
    old = sp.set_threads(1)
    yield path
    sp.set_threads(old)


@pytest.fixture(scope="module")
def emma() -> list[int]:
    return sp.load_stream(TOKENS, "emma")


def _nll(model: str, cfg, ids: list[int], **kwargs) -> np.ndarray:
    llm = sp.make_engine(model, cfg, len(ids), block_size=BLOCK, **kwargs)
    try:
        assert sp.max_prompt(llm) >= len(ids)
        return sp.token_nll(llm, ids)
    finally:
        del llm


@pytest.fixture(scope="module")
def runs(model, emma) -> dict[str, np.ndarray]:
    """-log p per token of the same 4096 tokens: stock vLLM dense, 4 sinks, window only."""
    out = {}
    for cfg in (sp.parse_config("dense"), SINKS4, WINDOW_ONLY):
        t0 = time.perf_counter()
        out[cfg.name] = _nll(model, cfg, emma)
        print(f"{cfg.name}: ppl {np.exp(out[cfg.name].mean()):.2f} ({time.perf_counter() - t0:.0f} s)")
    return out


def ppl(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))


def test_four_sinks_stay_within_15_percent_of_dense(runs):
    dense, sinks = ppl(runs["dense"]), ppl(runs[SINKS4.name])
    assert abs(sinks / dense - 1) < 0.15, f"4 sinks + W=256: {sinks:.2f} vs dense {dense:.2f}"
    # Most of the stream is in the streaming regime, where only 260 keys are attended:
    # the match is not the dense regime's.
    assert SinkPolicy(4, SINKS4.window(BLOCK), BLOCK).dense_tokens < TOKENS // 10


def test_window_attention_alone_collapses(runs):
    sinks, window = ppl(runs[SINKS4.name]), ppl(runs[WINDOW_ONLY.name])
    # Window-only holds the same KV blocks and attends more tokens (288 vs 4 + 256).
    assert window > 1.5 * sinks, f"window only W=288: {window:.2f} vs 4 sinks + W=256: {sinks:.2f}"


def test_dense_regime_of_the_bf16_runs_is_the_stock_engine(runs):
    """Before the window first slides, both policies compute dense attention: same perplexity
    as stock vLLM up to bf16 rounding (the two attention kernels round differently)."""
    for cfg in (SINKS4, WINDOW_ONLY):
        n = SinkPolicy(cfg.sinks, cfg.window(BLOCK), BLOCK).dense_tokens - 1  # predictions of t < dense_tokens
        a, b = runs["dense"][:n], runs[cfg.name][:n]
        assert abs(ppl(b) / ppl(a) - 1) < 0.01, cfg.name
        assert np.abs(a - b).mean() < 0.06, cfg.name


def test_prompt_logprobs_equal_stock_vllm_below_the_window(model, emma):
    """512 tokens, window 992: every query is in the dense regime. In float32 (the bf16
    weights upcast exactly) the plugin's prompt logprobs are stock vLLM's to float
    tolerance, with chunked prefill (two 256-token chunks)."""
    cfg = sp.parse_config("S4@1024")
    ids = emma[:512]
    assert len(ids) < SinkPolicy(4, cfg.window(BLOCK), BLOCK).dense_tokens
    stock = _nll(model, sp.parse_config("dense"), ids, chunk=256, dtype="float32")
    ours = _nll(model, cfg, ids, chunk=256, dtype="float32")
    diff = np.abs(stock - ours)
    assert diff.max() < 1e-3, f"max |plugin - stock| = {diff.max():.3g} at token {diff.argmax() + 1}"
