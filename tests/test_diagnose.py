"""`streaming-sink diagnose` (streaming_sink_tools/diagnose.py, streaming_sink_tools/cli.py).

The figures against hand computations; tiny models built so that chosen heads have a known
sink (and one head is also dormant), a model with exactly uniform attention, learned sink
logits (tiny GPT-OSS); bad inputs through the CLI. One `assets` test runs SmolLM2 briefly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from assets import require_asset, require_modules

require_modules("torch", "transformers", hint="pip install 'streaming-sink[test]'")
import torch  # noqa: E402

from streaming_sink_tools import diagnose as D  # noqa: E402
from streaming_sink_tools.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T = 128  # tokens per window in the tiny-model tests (max_position_embeddings 256)
TEXT = (Path(__file__).parent / "tiny_models.py").read_text()  # any text: the tiny BPE encodes every byte

# ---- tiny models with known sinks -----------------------------------------------------------
# Two hidden dimensions are reserved: D_SINK is non-zero only in the BOS embedding, D_CONST is 1
# in every embedding. No layer writes them (their rows of o_proj / down_proj are zero), so they
# stay the embedding's in every layer. A sink head's query reads D_CONST and its key D_SINK, in
# the rotary pair of lowest frequency (dims 15, 31 of 32: at theta 1e4 it turns < 0.03 rad over
# 128 positions), so every query gives BOS (position 0) a large logit whatever the distance.
# No other projection row or column touches those dims: the other heads see no sink signal.
D_SINK, D_CONST = 126, 127
ROT_DIM, HEAD_DIM = 15, 32
SINK_HEADS = {(0, 1): "dormant", (1, 3): "active"}  # (layer, query head): BOS value zero / large


def _edit_llama(src: str, dst: Path, sink_heads=SINK_HEADS, uniform=False) -> str:
    import shutil

    from transformers import LlamaForCausalLM

    shutil.copytree(src, dst)
    model = LlamaForCausalLM.from_pretrained(str(dst), dtype=torch.float32)
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    special = [D_SINK, D_CONST]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, D_SINK], emb[:, D_CONST] = 0.0, 1.0
        emb[cfg.bos_token_id] = 0.0
        emb[cfg.bos_token_id, D_SINK], emb[cfg.bos_token_id, D_CONST] = 8.0, 1.0
        for li, layer in enumerate(model.model.layers):
            at = layer.self_attn
            q, k, v = at.q_proj.weight, at.k_proj.weight, at.v_proj.weight
            for w in (q, k, v):
                w[:, special] = 0.0
            for h in range(cfg.num_attention_heads):
                q[[h * HEAD_DIM + ROT_DIM, h * HEAD_DIM + ROT_DIM + 16]] = 0.0
            for g in range(cfg.num_key_value_heads):
                k[[g * HEAD_DIM + ROT_DIM, g * HEAD_DIM + ROT_DIM + 16]] = 0.0
            at.o_proj.weight[special] = 0.0
            layer.mlp.down_proj.weight[special] = 0.0
            for (sl, h), kind in sink_heads.items():
                if sl != li:
                    continue
                g = h // groups
                q[h * HEAD_DIM + ROT_DIM, D_CONST] = 4.0
                k[g * HEAD_DIM + ROT_DIM, D_SINK] = 4.0
                if kind == "active":  # BOS carries a large value in this KV head: the head's output is not small
                    v[g * HEAD_DIM : (g + 1) * HEAD_DIM, D_SINK] = 3.0
            if uniform:
                q.zero_()  # every logit 0: each query spreads evenly over its keys
    model.save_pretrained(str(dst), safe_serialization=True)
    return str(dst)


@pytest.fixture(scope="module")
def sink_llama(tiny_llama, tmp_path_factory) -> str:
    return _edit_llama(tiny_llama, tmp_path_factory.mktemp("sink") / "m")


@pytest.fixture(scope="module")
def uniform_llama(tiny_llama, tmp_path_factory) -> str:
    return _edit_llama(tiny_llama, tmp_path_factory.mktemp("uniform") / "m", sink_heads={}, uniform=True)


@pytest.fixture(scope="module")
def sink_result(sink_llama) -> dict:
    return D.diagnose(sink_llama, text=TEXT, samples=3, length=T)


# ---- the formulas, by hand --------------------------------------------------------------------


def _hand_attention():
    # one head, T = 4; row i is query i (causal: zeros above the diagonal)
    return torch.tensor([[[1.0, 0.0, 0.0, 0.0],
                          [0.5, 0.5, 0.0, 0.0],
                          [0.2, 0.3, 0.5, 0.0],
                          [0.1, 0.1, 0.2, 0.6]]])


def test_head_figures_match_a_hand_computation():
    f = D.head_figures(_hand_attention(), short_t=2)
    # Gu et al.: alpha_0 = mean over queries i >= 0 of A[i, 0]
    assert f["alpha"][0, 0] == pytest.approx((1.0 + 0.5 + 0.2 + 0.1) / 4)
    assert f["alpha0_short"][0] == pytest.approx((1.0 + 0.5) / 2)  # the first 2 queries only
    # first-k share: mean over queries i >= k of the mass on keys [0, k)
    assert f["prefix"][0, 0] == pytest.approx((0.5 + 0.2 + 0.1) / 3)
    assert f["prefix"][0, 1] == pytest.approx((0.5 + 0.2) / 2)
    assert f["prefix"][0, 2] == pytest.approx(0.4)
    assert np.isnan(f["prefix"][0, 3:]).all()  # no query after a 4-token prefix in 4 tokens
    assert f["alpha"][0, 3] == pytest.approx(0.6) and np.isnan(f["alpha"][0, 4:]).all()
    assert f["learned_sink"][0] == pytest.approx(0.0, abs=1e-6)  # float32 rows
    # a sliding window of 2: query i sees key j iff i - j < 2, so only queries 0 and 1 see key 0
    assert f["alpha"][0, 1] == pytest.approx((0.5 + 0.3 + 0.1) / 3)  # key 1: queries 1, 2, 3
    w = D.head_figures(_hand_attention(), window=2)
    assert w["alpha"][0, 0] == pytest.approx((1.0 + 0.5) / 2)
    assert w["alpha"][0, 1] == pytest.approx((0.5 + 0.3) / 2)  # key 1: queries 1, 2
    # rows summing to less than 1: the rest went to a learned sink logit
    assert D.head_figures(0.8 * _hand_attention())["learned_sink"][0] == pytest.approx(0.2, abs=1e-6)


def test_sink_rate_formula():
    alpha = np.array([[[0.5, 0.1], [0.31, 0.3]],   # sample 0: layer 0, layer 1 (2 heads each)
                      [[0.29, 0.9], [0.0, 1.0]]])  # sample 1
    # entries strictly above eps = 0.3: 0.5, 0.31, 0.9, 1.0 -> 4 of 8
    assert D.sink_rate_percent(alpha, 0.3) == pytest.approx(50.0)
    assert D.sink_rate_percent(alpha, 0.95) == pytest.approx(12.5)
    assert D.sink_rate_percent(np.zeros((1, 3, 4)), 0.3) == 0.0


def test_recommendation_rule():
    # alpha of shape (samples=1, layers=1, heads=4, positions=3); eps = 0.3
    alpha = np.array([[[[0.8, 0.0, 0.0],     # a sink at 0
                        [0.6, 0.0, 0.1],     # a sink at 0; 0.1 at 2 is ordinary attention, below eps
                        [0.0, 0.0, 0.4],     # a sink at 2
                        [0.1, 0.1, 0.1]]]])  # none
    rec = D.recommend(alpha, eps=0.3, mass=0.9, min_rate=1.0)
    # sink mass: j=0: (0.8 + 0.6) / 4, j=1: 0, j=2: 0.4 / 4 -> [0, 1) holds 1.4 / 1.8 = 78% < 90%
    assert rec["sink_mass_by_position"] == pytest.approx([0.35, 0.0, 0.1])
    assert rec["sink_rate_by_position_percent"] == pytest.approx([50.0, 0.0, 25.0])
    assert rec["sink_rate_any_position_percent"] == pytest.approx(75.0)
    assert (rec["recommended_sink_tokens"], rec["needs_sink_tokens"]) == (3, True)
    assert D.recommend(alpha, eps=0.3, mass=0.75, min_rate=1.0)["recommended_sink_tokens"] == 1
    none = D.recommend(np.full((2, 3, 4, 16), 0.05), eps=0.3, mass=0.9, min_rate=1.0, learned_sink=0.6)
    assert (none["recommended_sink_tokens"], none["needs_sink_tokens"]) == (0, False)
    assert "learned sink" in none["recommendation"]


def test_windows_are_spread_and_carry_the_special_prefix():
    ids = list(range(1000))
    ws = D.token_windows(ids, [7], samples=3, length=101)
    assert [len(w) for w in ws] == [101] * 3
    assert [w[:2] for w in ws] == [[7, 0], [7, 450], [7, 900]]
    with pytest.raises(D.DiagnoseError, match="1000 tokens"):
        D.token_windows(ids, [], samples=1, length=1001)


# ---- tiny models ------------------------------------------------------------------------------


def test_finds_the_built_sink_heads_and_only_them(sink_result):
    res = sink_result
    first = np.array(res["first_token_share"])
    assert first.shape == (2, 4)
    for (l, h), share in np.ndenumerate(first):
        if (l, h) in SINK_HEADS:
            assert share > 0.95, (l, h, share)
        else:
            assert share < res["eps"], (l, h, share)
    assert res["sink_rate_percent"] == pytest.approx(100 * 2 / 8)  # 2 of 8 heads, in every sample
    assert res["special_prefix"] == [1]  # each window starts with <s>, the sink
    # layer 0 head 1 attends a zero value: its output is tiny next to the layer's others
    assert res["dormant_heads"] == [[0, 1]]
    assert res["head_output_norm_ratio"][0][1] < 0.05 and res["head_output_norm_ratio"][1][3] > 1
    assert res["recommended_sink_tokens"] == 1 and res["needs_sink_tokens"]
    assert res["learned_sink_share"] is None


def test_uniform_attention_has_no_sink(uniform_llama):
    res = D.diagnose(uniform_llama, text=TEXT, samples=2, length=T)
    first = np.array(res["first_token_share"])
    # every query spreads evenly: alpha_0 = mean_i 1 / (i + 1), the floor
    assert first == pytest.approx(np.full((2, 4), D.uniform_alpha0(T)), abs=1e-6)
    assert res["sink_rate_percent"] == 0.0 and res["sink_rate_percent_t64"] == 0.0
    k4 = np.mean([4 / (i + 1) for i in range(4, T)])
    assert np.array(res["first_k_share"]["4"]) == pytest.approx(np.full((2, 4), k4), abs=1e-6)
    assert res["dormant_heads"] == []
    assert res["recommended_sink_tokens"] == 0 and not res["needs_sink_tokens"]


def test_learned_sink_logits_are_measured(tmp_path):
    from tiny_models import build_tiny_gptoss
    from transformers import GptOssForCausalLM

    path = build_tiny_gptoss(tmp_path / "gptoss")
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-30.0)  # takes nothing
        model.model.layers[1].self_attn.sinks[0] = 30.0  # takes everything
    model.save_pretrained(path)
    res = D.diagnose(path, text=TEXT, samples=2, length=64)
    learned = np.array(res["learned_sink_share"])
    assert learned.shape == (3, 4)
    assert learned[1, 0] > 0.999
    learned[1, 0] = 0.0
    assert learned.max() < 1e-6
    assert res["first_token_share"][1][0] < 1e-6  # nothing left for token 0
    assert res["layer_windows"] == [32, None, 32]  # GPT-OSS's sliding layers, from the modules


# ---- the command line -------------------------------------------------------------------------


REQUIRED_KEYS = {"first_token_share", "sink_rate_percent", "eps", "dormant_heads",
                 "recommended_sink_tokens", "samples", "length", "model"}


def test_cli_writes_json_and_png_and_prints_the_table(sink_llama, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    rc = main(["diagnose", sink_llama, "--text", str(text), "--samples", "2", "--length", str(T),
               "--out", str(out), "--eps", "0.5", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "sinks.json").read_text())
    assert REQUIRED_KEYS <= set(res)
    assert (res["samples"], res["length"], res["eps"], res["model"]) == (2, T, 0.5, sink_llama)
    assert len(res["first_token_share"]) == 2 and len(res["first_token_share"][0]) == 4
    assert all(0.0 <= v <= 1.0 for row in res["first_token_share"] for v in row)
    assert res["dormant_heads"] == [[0, 1]] and res["recommended_sink_tokens"] == 1
    assert (out / "sinks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "sink rate" in table and "recommended --sink-tokens 1" in table
    assert len([ln for ln in table.splitlines() if ln.strip().startswith(("0 ", "1 "))]) == 2


def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what building the model printed
    rc = main(["diagnose", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("streaming-sink diagnose: error: ") and err.count("\n") == 1, err
    return err


def test_cli_refuses_a_path_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    assert "is not a model" in _cli_error(capsys, tmp_path, "--text", tmp_path / "t.txt")
    assert "is not a model" in _cli_error(capsys, tmp_path / "t.txt", "--text", tmp_path / "t.txt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    assert "cannot" in _cli_error(capsys, tmp_path / "bad", "--text", tmp_path / "t.txt")


def test_cli_refuses_a_model_without_attention_weights(tmp_path, capsys):
    from tiny_models import build_tokenizer
    from transformers import MambaConfig, MambaForCausalLM

    (tmp_path / "t.txt").write_text(TEXT)
    path = tmp_path / "mamba"
    config = MambaConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, state_size=4)
    MambaForCausalLM(config).save_pretrained(path)  # a causal LM with no attention at all
    build_tokenizer(path, 384)
    err = _cli_error(capsys, path, "--text", tmp_path / "t.txt", "--length", 32)
    assert "attention weights cannot be obtained" in err


def test_attention_that_returns_no_weights_is_refused(sink_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sink_llama, attn_implementation="sdpa")
    with pytest.raises(D.DiagnoseError, match="attention weights cannot be obtained"):
        D.diagnose(sink_llama, text=TEXT, samples=1, length=32, model=model,
                   tokenizer=AutoTokenizer.from_pretrained(sink_llama))
    model.config._attn_implementation = "eager"  # claims eager, but the module hands back no weights
    for layer in model.model.layers:
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=forward, **k: (_f(*a, **k)[0], None)
    with pytest.raises(D.DiagnoseError, match="layer 0 .*returned none"):
        D.diagnose(sink_llama, text=TEXT, samples=1, length=32, model=model,
                   tokenizer=AutoTokenizer.from_pretrained(sink_llama))


def test_cli_refuses_a_text_shorter_than_length(sink_llama, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Only a few words.")
    err = _cli_error(capsys, sink_llama, "--text", tmp_path / "short.txt", "--length", T)
    assert "--length 128 needs 127" in err
    assert "No such file" in _cli_error(capsys, sink_llama, "--text", tmp_path / "missing.txt")


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "streaming_sink_tools.cli", "diagnose", str(tmp_path), "--text", __file__],
                       check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
    assert "is not a model" in p.stderr


# ---- the real model ---------------------------------------------------------------------------


@pytest.mark.assets
def test_smollm2_has_a_first_token_sink(tmp_path):
    from streaming_sink_tools import prepare as P

    model = require_asset("the prepared SmolLM2 folder (float32)",
                          lambda: P.default_model_path(prepare=True, dtype="float32"))
    text = require_asset("the Austen corpus", lambda: P.corpus_text("emma", prepare=True))
    res = D.diagnose(model, text=text, samples=2, length=256)
    first = np.array(res["first_token_share"])
    assert first.shape == (30, 9)
    assert first[12:].mean() > 0.3 and first[:2].mean() < 0.05  # sinks live in the upper layers
    assert res["sink_rate_percent"] > 30 and res["needs_sink_tokens"]
    assert res["recommended_sink_tokens"] == 1  # docs/streaming-perplexity.md: one sink recovers everything
