"""A tiny random GPT-OSS (learned sinks, sliding + full layers, YaRN, MoE) through the real
``sglang.Engine`` with the policy on, against the GPT-OSS oracle (tests/oracle_gptoss.py).

SGLang keeps GPT-OSS's sink logits in bfloat16 (float32 only for trtllm_mha), so the model's
sinks are written bfloat16-exact: the comparison is then of the attention, not of a cast.

On CPU, SGLang 0.5.23 picks its ``triton_kernel`` MoE runner for an unquantized GPT-OSS,
whose transposed expert layout its CPU fallback then multiplies the wrong way round
("mat1 and mat2 shapes cannot be multiplied"), with or without this plugin; the
``triton`` runner (``--moe-runner-backend triton``) loads the transformers checkpoint as
is and runs it through the native MoE path.
"""

from __future__ import annotations

import pytest
import torch

from oracle_gptoss import OracleGptOss
from sglang_helpers import TOL, S, W, engine_args, greedy, prompt_logprobs, random_ids

CONTEXT = 128  # YaRN factor 4 over 32 original positions


@pytest.fixture(scope="module")
def tiny_gptoss(tmp_path_factory) -> str:
    from safetensors.torch import load_file, save_file

    from tiny_models import build_tiny_gptoss

    path = build_tiny_gptoss(tmp_path_factory.mktemp("tiny-gptoss"), max_position_embeddings=CONTEXT,
                             yarn_original_max_position_embeddings=CONTEXT // 4)
    f = f"{path}/model.safetensors"
    weights = load_file(f)
    for name in [n for n in weights if n.endswith("self_attn.sinks")]:
        weights[name] = weights[name].to(torch.bfloat16).float()
    save_file(weights, f, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def engine(tiny_gptoss):
    import sglang

    # GPT-OSS in SGLang insists on a backend name from its list; ours replaces it.
    eng = sglang.Engine(**engine_args(tiny_gptoss, attention_backend="triton", moe_runner_backend="triton"))
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def oracle(tiny_gptoss):
    return OracleGptOss(tiny_gptoss, sink_tokens=S, window_tokens=W, block_size=1)


def test_gptoss_prompt_logprobs_match_oracle(engine, oracle, tiny_gptoss):
    ids = random_ids(8 * CONTEXT, seed=3)
    got = prompt_logprobs(engine, ids)
    want = oracle.token_logprobs(ids)
    diff = (got - want).abs()
    print(f"GPT-OSS prompt logprobs, {len(ids)} tokens: max |engine - oracle| = {diff.max():.3g}")
    assert diff.max().item() < TOL, f"max diff {diff.max():.3g} at token {diff.argmax() + 1}"
    # The learned sinks matter: the same stream without them is another stream.
    no_sinks = OracleGptOss(tiny_gptoss, sink_tokens=S, window_tokens=W, block_size=1)
    for layer in no_sinks.layers:
        layer["sinks"] = torch.full_like(layer["sinks"], -1e9)
    assert (no_sinks.token_logprobs(ids[:300]) - want[:299]).abs().max() > 1e-2


def test_gptoss_concurrent_greedy_decode_matches_oracle(engine, oracle):
    prompts = [random_ids(n, seed=40 + n) for n in (50, 400)]
    n_new = 16 * CONTEXT
    for prompt, (gen, got) in zip(prompts, greedy(engine, prompts, n_new)):
        assert len(gen) == n_new
        lp = oracle.logprobs(prompt + gen)[len(prompt) - 1:-1]
        want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs()
        print(f"GPT-OSS greedy, prompt {len(prompt)} + {n_new}: max |engine - oracle| = {diff.max():.3g}")
        assert diff.max().item() < TOL, f"prompt {len(prompt)}: max diff {diff.max():.3g} at step {diff.argmax()}"


def test_gptoss_radix_cache_turns_match_oracle(engine, oracle):
    """The radix cache (on by default) with learned sinks and sliding layers: a 3-turn
    session, each turn served from the cache but its new message, equals the oracle."""
    prompt, cached_want = random_ids(300, seed=60), 0
    for turn in range(3):
        [(gen, got)], cached = _greedy_cached(engine, prompt, 40)
        assert cached == cached_want, f"turn {turn}: {cached} cached, want {cached_want}"
        lp = oracle.logprobs(prompt + gen)[len(prompt) - 1:-1]
        want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs().max().item()
        print(f"GPT-OSS radix turn {turn}: prompt {len(prompt)}, cached {cached}, max diff {diff:.3g}")
        assert diff < TOL
        cached_want = len(prompt) + len(gen) - 1
        prompt = prompt + gen + random_ids(30, seed=61 + turn)


def _greedy_cached(engine, prompt, n):
    out = engine.generate(input_ids=[prompt], sampling_params={
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}, return_logprob=True)[0]
    lp = out["meta_info"]["output_token_logprobs"]
    return ([([t for _, t, _ in lp], torch.tensor([x for x, _, _ in lp], dtype=torch.float64))],
            out["meta_info"]["cached_tokens"])
