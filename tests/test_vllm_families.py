"""Model families with their own sliding layers on the real vLLM engine (CPU build) with
--kv-policy streaming-sink, each against its independent oracle: one suite, parametrized
over (model family, oracle).

* ``gptoss``: tiny random GptOssForCausalLM (learned sinks, sliding + full layers, YaRN
  4 x 64, MoE) vs tests/oracle_gptoss.py. Under the policy all three layers honour the
  learned sinks.
* ``gemma3``: tiny random Gemma3ForCausalLM (sliding layers with their own window and
  RoPE base 1e4, a global layer with base 1e6, q/k norms, sandwich norms, a final logit
  soft-cap) vs tests/oracle_gemma3.py. What vLLM's Gemma 3 has that the backend refuses:
  nothing. vLLM 0.32's Gemma 3 hard-codes ``attn_logits_soft_cap=None`` (Gemma 2's
  attention soft-cap is gone; HF 5.19 does not apply ``attn_logit_softcapping`` to Gemma 3
  either), and ``final_logit_softcapping`` is applied by the logits processor, outside
  attention: the tiny model sets it to 8 and the engine matches the oracle's cap.

Both: layers sliding(32) / full / sliding(32), max_position_embeddings 256, block 32,
S=4, W=128: the dense regime ends at token 192 and every stream here is 16x the model's
context. Under the policy the full layer becomes a sink+window layer, the sliding layers
keep their own 32-token window; every layer rotates at positions inside the cache, each
with its own rotary module's frequencies.

All engines of a family live in module-scoped fixtures until its last test (pytest runs
one family's tests, then the other's): deleting an in-process vLLM engine tears down
process-wide state other engines use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import tiny_models
from oracle import check_greedy
from oracle_gemma3 import OracleGemma3
from oracle_gptoss import OracleGptOss
from vllm_helpers import BS, S, W, SamplingParams, free_blocks, greedy, kv_manager, make_llm, \
    output_logprobs, prompt_logprobs, random_ids, run_stepwise_by_group
from vllm_helpers import llm, stock  # noqa: F401 (the engines of `model`, module-scoped fixtures)

from streaming_sink.policy import PolicyConfigError, SinkPolicy

CONTEXT = 256  # max_position_embeddings of both tiny models
SLIDING = 32  # their sliding layers' own window
CHUNK = 200  # max_num_batched_tokens of make_llm
POLICY = SinkPolicy(S, W, BS)
# float32 engine vs float64 oracle, logprobs (measured: GPT-OSS ~2e-4, Gemma 3 < 1e-5)
TOL = 5e-4


@dataclass(frozen=True)
class Family:
    name: str
    build: str  # the tests/tiny_models.py builder
    oracle: type
    rope_tables: int  # distinct rotary modules (Gemma 3: one per layer type, its own base)

    def layer_inv_freq(self, oracle, layer_type: str) -> torch.Tensor:
        freqs = oracle.inv_freq
        return freqs[layer_type] if isinstance(freqs, dict) else freqs


FAMILIES = {f.name: f for f in (
    Family("gptoss", "build_tiny_gptoss", OracleGptOss, rope_tables=1),
    Family("gemma3", "build_tiny_gemma3", OracleGemma3, rope_tables=2),
)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def model(family, tmp_path_factory) -> str:
    return getattr(tiny_models, family.build)(tmp_path_factory.mktemp(f"tiny-{family.name}"))


def test_layer_window_longer_than_policy_window_refused(family, tmp_path):
    """A layer window that reaches past --sink-window is refused at startup, before
    any engine is built (so this test leaves the process's vLLM state untouched;
    Gemma 3 270m: 512 needs --sink-window >= 512)."""
    path = getattr(tiny_models, family.build)(tmp_path / "sw48", sliding_window=48)
    with pytest.raises(PolicyConfigError, match=r"--sink-window >= 64"):
        make_llm(path, sink_window=32)


@pytest.fixture(scope="module")
def oracle(family, model):
    return family.oracle(model, sink_tokens=S, window_tokens=W, block_size=BS)


def _groups(llm):
    """The engine's per-group KV managers, by kind: 'sink+window' or 'sliding'."""
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    from vllm_sink.kv_manager import StreamingSinkManager

    kinds = []
    for m in kv_manager(llm).coordinator.single_type_managers:
        if isinstance(m, StreamingSinkManager):
            kinds.append(("sink+window", m))
        elif isinstance(m, SlidingWindowManager):
            assert m.kv_cache_spec.sliding_window == SLIDING
            kinds.append(("sliding", m))
        else:
            raise AssertionError(f"unexpected KV manager {type(m).__name__}")
    return kinds


def _attention_layers(llm):
    from vllm.model_executor.layers.attention import Attention

    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    return {name: m for name, m in ctx.items() if isinstance(m, Attention)}


# Most blocks one request may hold per group, with a prefill chunk of CHUNK tokens in
# flight. sink+window: sinks + window + current block + the chunk's blocks. sliding:
# vLLM keeps tokens [n - sw + 1, n + chunk) of a request with n tokens computed.
BOUND = {"sink+window": POLICY.max_live_blocks(CHUNK),
         "sliding": math.ceil((SLIDING - 1 + CHUNK - 1) / BS) + 1}


def test_engine_groups_use_the_policy_block_size(llm):
    """Both KV group kinds exist, each with the policy's block size; the full layer is
    the sink+window one."""
    groups = _groups(llm)
    assert sorted({k for k, _ in groups}) == ["sink+window", "sliding"]
    assert all(m.kv_cache_spec.block_size == BS for _, m in groups)
    sw = [m for k, m in groups if k == "sink+window"]
    assert all(m.kv_cache_spec.sliding_window == W and m.kv_cache_spec.sink_tokens == S for m in sw)


def test_each_layer_rotates_with_its_own_rope(family, llm, oracle):
    """The per-block query rotation of each layer uses its own rotary module's frequencies
    (read off that module's table as a pure rotation): GPT-OSS's one YaRN table, without
    its magnitude; Gemma 3's two (base 1e4 for sliding layers, 1e6 for the global one)."""
    layers = _attention_layers(llm)
    assert len(layers) == 3
    seen, tables = set(), []
    for name, layer in sorted(layers.items()):
        kind = oracle.layer_types[int(name.split("layers.")[1].split(".")[0])]
        rope = layer.impl.rope
        assert rope is not None and rope.rotary_dim == 32 and rope.is_neox_style
        want = family.layer_inv_freq(oracle, kind)
        torch.testing.assert_close(rope.inv_freq.double().cpu(), want, rtol=1e-5, atol=1e-9)
        seen.add(kind)
        if not any(t is want for t in tables):
            tables.append(want)
    assert seen == {"sliding_attention", "full_attention"}
    assert len(tables) == family.rope_tables
    if family.rope_tables == 2:
        assert (tables[0] - tables[1]).abs().max() > 1e-2  # really two different tables


def test_teacher_forced_prompt_logprobs_match_oracle(family, llm, oracle, model):
    # 16x the context in chunks of 200 tokens (one chunk crosses the switch at 192)
    ids = random_ids(16 * CONTEXT, seed=1)
    got = prompt_logprobs(llm, ids)
    want = oracle.token_logprobs(ids)
    diff = (got - want).abs()
    print(f"\n{family.name}, teacher-forced {len(ids)} tokens: max |engine - oracle| = {diff.max():.3g} "
          f"(dense part {diff[:POLICY.dense_tokens - 1].max():.3g})")
    assert diff.max().item() < TOL, f"max |engine - oracle| = {diff.max():.3g} at token {diff.argmax() + 1}"
    # The streaming regime really differs from the dense model (not a vacuous match).
    dense = family.oracle(model)
    tail = slice(POLICY.dense_tokens, CONTEXT - 1)
    assert (dense.token_logprobs(ids[:CONTEXT])[tail] - want[tail]).abs().max() > 1e-2


def _run_stepwise(llm, requests, abort_at=None, logprobs=False):
    return run_stepwise_by_group(llm, requests, _groups(llm), abort_at, logprobs)


def test_batched_decode_matches_oracle_with_bounded_blocks(family, llm, oracle):
    """3 concurrent requests, 16x the context each: greedy tokens and their logprobs
    match the oracle; both group kinds stay bounded every step; all blocks return."""
    start = free_blocks(llm)
    n_new = 16 * CONTEXT
    prompts = {f"r{n}": random_ids(n, seed=10 + n) for n in (37, 300, 700)}
    peak, final = _run_stepwise(llm, {r: (p, n_new) for r, p in prompts.items()}, logprobs=True)
    print(f"\n{family.name}, peak blocks per request: {peak} (bounds {BOUND}; no recycling: "
          f"{math.ceil((700 + n_new) / BS)})")
    for kind in BOUND:
        assert peak[kind] <= BOUND[kind], (kind, peak, BOUND)
    assert peak["sink+window"] > POLICY.sink_blocks + POLICY.window_blocks  # really used the window
    assert free_blocks(llm) == start
    for rid, prompt in prompts.items():
        gen, got = output_logprobs(final[rid])
        assert len(gen) == n_new
        check_greedy(oracle.logprobs(prompt + gen), len(prompt), gen, got, TOL, rid)


def test_abort_mid_stream_returns_every_block(llm):
    start = free_blocks(llm)
    requests = {"keep": (random_ids(50, seed=3), 3 * CONTEXT), "drop": (random_ids(900, seed=4), 8 * CONTEXT)}
    peak, final = _run_stepwise(llm, requests, abort_at={"drop": 2 * CONTEXT})
    assert len(final["keep"].outputs[0].token_ids) == 3 * CONTEXT
    assert 2 * CONTEXT <= len(final["drop"].outputs[0].token_ids) < 8 * CONTEXT
    for kind in BOUND:
        assert peak[kind] <= BOUND[kind], (kind, peak, BOUND)
    assert free_blocks(llm) == start


def test_multi_turn_session_hits_through_the_hybrid_coordinator(llm, oracle):
    """Ten turns, each the whole history plus a new message (17x the context): vLLM's
    hybrid coordinator finds hits both group kinds agree on, and outputs match the oracle.
    vLLM's sliding layers keep only each prompt's replay boundary by default
    (--prefix-cache-retention-interval 0), so a turn resumes at the previous prompt."""
    start = free_blocks(llm)
    history, turns = random_ids(300, seed=61), []
    for turn in range(10):
        gen, lps, cached = greedy(llm, history, 60)
        turns.append((len(history), gen, lps, cached))
        history = history + gen + random_ids(350, seed=620 + turn)
    assert len(history) >= 16 * CONTEXT
    lp = oracle.logprobs(history)
    for i, (n, gen, lps, cached) in enumerate(turns):
        check_greedy(lp, n, gen, lps, TOL, f"turn {i}")
        assert cached == (0 if i == 0 else (turns[i - 1][0] - 1) // BS * BS), f"turn {i}"
    assert free_blocks(llm) == start


# ---- policy off: stock vLLM, and the policy's dense regime equals it -----------

def test_policy_off_is_stock_vllm(family, model, llm, stock):
    """With the policy off the plugin is out of the path (vLLM's own CPU attention,
    rotary and KV managers), and that stock engine computes the dense model."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    config = stock.llm_engine.vllm_config
    assert "streaming_sink" not in (config.additional_config or {})
    assert config.attention_config.backend != AttentionBackendEnum.CUSTOM
    layers = _attention_layers(stock)
    assert len(layers) == 3 and all(type(layer.impl).__module__.startswith("vllm.") for layer in layers.values())
    assert [type(m).__name__ for m in kv_manager(stock).coordinator.single_type_managers].count(
        "StreamingSinkManager") == 0
    ids = random_ids(CONTEXT - 1, seed=5)
    want = family.oracle(model).token_logprobs(ids)
    diff = (prompt_logprobs(stock, ids) - want).abs().max().item()
    print(f"\n{family.name}, stock vLLM vs dense oracle, {len(ids)} tokens: max diff {diff:.3g}")
    assert diff < TOL
    # past the policy's dense regime the policy engine computes something else
    assert (prompt_logprobs(llm, ids) - want)[POLICY.dense_tokens:].abs().max().item() > 1e-2


def test_below_the_window_equals_policy_off(family, llm, stock):
    prompts = [random_ids(n, seed=20 + n) for n in (5, 64, 120)]
    params = SamplingParams(max_tokens=POLICY.dense_tokens - 121, temperature=0, ignore_eos=True, logprobs=0)
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    theirs = stock.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    worst = 0.0
    for a, b in zip(ours, theirs):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        la = [d[t].logprob for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [d[t].logprob for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        worst = max(worst, max(abs(x - y) for x, y in zip(la, lb)))
    print(f"\n{family.name}, policy engine vs stock vLLM below the window: max logprob diff {worst:.3g}")
    assert worst < TOL


# ---- no engine ----------------------------------------------------------------

def test_rotary_frequencies_are_pure_yarn_rotations():
    """The per-block query rotation reads vLLM's YaRN table (GPT-OSS) as a pure rotation:
    the YaRN frequencies (as HF/the oracle compute them), without the magnitude."""
    from oracle_gptoss import yarn_attention_factor, yarn_inv_freq
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from streaming_sink.rotary_walk import rotary_params

    with set_current_vllm_config(VllmConfig()):  # a CustomOp: needs a config even outside an engine
        rope = get_rope(32, max_position=CONTEXT, dtype=torch.float32, is_neox_style=True, rope_parameters={
            "rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False})
    assert rope.mscale == pytest.approx(yarn_attention_factor(4.0)) and rope.mscale > 1.1
    params = rotary_params(rope, POLICY, "yarn")
    want = yarn_inv_freq(32, 10000.0, 4.0, 64, 32.0, 1.0, truncate=False)
    assert (params.inv_freq.double() - want).abs().max().item() < 1e-6
    assert params.rotary_dim == 32 and params.is_neox_style
