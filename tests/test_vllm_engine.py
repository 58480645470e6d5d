"""The real vLLM engine (CPU build) with --kv-policy streaming-sink, against the oracle.

Tiny random Llama and Qwen3 (the same shape plus q/k RMSNorm): max_position_embeddings
256, block 32, S=4, W=128, so the dense regime ends at token 192 and every stream here
is 8-16x the context.
"""

from __future__ import annotations

import pytest
import torch

from oracle import OracleLlama
from vllm_helpers import BS, S, W, SamplingParams, free_blocks, live_blocks, make_llm, \
    assert_dense_equals_stock, prompt_logprobs, random_ids
from vllm_helpers import llm, stock  # noqa: F401 (the engines of `model`, module-scoped fixtures)

from streaming_sink.policy import PolicyConfigError, SinkPolicy

CONTEXT = 256
POLICY = SinkPolicy(S, W, BS)
TOL = 2e-4  # float32 engine vs float64 oracle, logprobs


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request) -> str:
    """Every engine test runs on Llama and on Qwen3 (q/k RMSNorm before RoPE: the
    norm must come before the rotation at pos(t), in vLLM's model and the oracle's)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="module")
def oracle(model):
    return OracleLlama(model, sink_tokens=S, window_tokens=W, block_size=BS)


def test_teacher_forced_prompt_logprobs_match_oracle(llm, oracle, model):
    # 8x the context in chunks of 200 tokens: chunk edges fall inside blocks
    # and one chunk crosses the dense->streaming switch at token 192.
    ids = random_ids(8 * CONTEXT, seed=1)
    got = prompt_logprobs(llm, ids)
    want = oracle.token_logprobs(ids)
    diff = (got - want).abs()
    assert diff.max().item() < TOL, f"max |engine - oracle| = {diff.max():.3g} at token {diff.argmax() + 1}"
    # The streaming regime really differs from dense attention (not a vacuous match).
    dense = OracleLlama(model, sink_tokens=None)
    tail = slice(POLICY.dense_tokens, CONTEXT - 1)
    assert (dense.token_logprobs(ids[:CONTEXT])[tail] - want[tail]).abs().max() > 1e-2


def test_batched_greedy_decode_matches_oracle(llm, oracle):
    prompts = [random_ids(n, seed=10 + n) for n in (37, 300, 700)]
    n_new = 16 * CONTEXT
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        gen = list(out.outputs[0].token_ids)
        assert len(gen) == n_new
        got = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, gen)], dtype=torch.float64)
        full = prompt + gen
        lp = oracle.logprobs(full)[len(prompt) - 1:-1]  # predictions of the generated tokens
        want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
        diff = (got - want).abs()
        assert diff.max().item() < TOL, f"prompt {len(prompt)}: max diff {diff.max():.3g} at step {diff.argmax()}"
        # Greedy: each generated token is the oracle's argmax, up to float near-ties.
        top2 = lp.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert torch.equal(lp.argmax(1)[clear], torch.tensor(gen)[clear])


def test_below_the_window_equals_policy_off(llm, stock):
    """Dense rows run vLLM's own CPU attention op: bit-identical to stock (==)."""
    assert_dense_equals_stock(llm, stock, POLICY.dense_tokens)


def _run_stepwise(llm, requests: dict[str, tuple[list[int], int]], abort_at: dict[str, int] | None = None):
    """Step the engine, recording the most blocks any request held."""
    engine = llm.llm_engine
    for rid, (prompt, n) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    peak, produced, steps = 0, {rid: 0 for rid in requests}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
        steps += 1
        peak = max([peak, *live_blocks(llm).values()])
        for rid, at in (abort_at or {}).items():
            if produced.get(rid, 0) >= at:
                engine.abort_request([rid])
                abort_at = {k: v for k, v in abort_at.items() if k != rid}
                break
    return peak, produced


def test_live_blocks_bounded_and_all_returned(llm):
    start = free_blocks(llm)
    bound = POLICY.max_live_blocks(200)  # max_num_batched_tokens = 200
    requests = {f"r{n}": (random_ids(n, seed=n), 6 * CONTEXT) for n in (10, 450, 1300)}
    peak, produced = _run_stepwise(llm, requests)
    assert all(produced[r] == 6 * CONTEXT for r in requests)
    # Without recycling a 2800-token stream would hold 88 blocks.
    assert POLICY.sink_blocks + POLICY.window_blocks < peak <= bound
    assert free_blocks(llm) == start


def test_abort_mid_stream_returns_every_block(llm):
    start = free_blocks(llm)
    requests = {"keep": (random_ids(50, seed=3), 3 * CONTEXT), "drop": (random_ids(900, seed=4), 8 * CONTEXT)}
    peak, produced = _run_stepwise(llm, requests, abort_at={"drop": 2 * CONTEXT})
    assert produced["keep"] == 3 * CONTEXT
    assert 2 * CONTEXT <= produced["drop"] < 8 * CONTEXT
    assert peak <= POLICY.max_live_blocks(200)
    assert free_blocks(llm) == start


# ---- refusals at startup, each naming its flag ------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    (dict(sink_tokens=-1), "--sink-tokens"),
    (dict(sink_window=100), "--sink-window"),   # not a multiple of block 32
    (dict(sink_window=0), "--sink-window"),
    (dict(sink_window=256), "--sink-window"),   # 4 + 256 exceeds the 256-position rotary table
    (dict(kv_policy="evict-everything"), "--kv-policy"),
    (dict(kv_cache_dtype="int8_per_token_head"), "--kv-cache-dtype"),  # fp8: test_vllm_fp8.py
    (dict(enable_chunked_prefill=False), "chunked-prefill"),
    # Explicit flags the policy cannot honour are refused, never overridden:
    # --attention-backend names the inner backend (the dense rows' kernel): one that is
    # not a paged decoder backend the policy can wrap is refused
    (dict(attention_backend="FLEX_ATTENTION"), "--attention-backend FLEX_ATTENTION"),
    (dict(attention_config={"backend_per_kind": {"sliding_window": "CPU_ATTN"}}), "backend_per_kind"),
    (dict(compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"}), "cudagraph_mode FULL_AND_PIECEWISE"),
])
def test_bad_config_refused_at_startup(tiny_llama, kwargs, flag):
    args = dict(kv_policy="streaming-sink", sink_tokens=S, sink_window=W)
    args.update(kwargs)
    with pytest.raises(PolicyConfigError, match=flag):
        make_llm(tiny_llama, policy=False, **args)


def test_explicit_inner_backend_honoured(tiny_llama):
    """--attention-backend CPU_ATTN (the CPU platform's own) becomes the inner backend:
    the engine starts, its layers run the policy's backend wrapped around CPU_ATTN."""
    from vllm_sink.backend import SinkImpl

    llm = make_llm(tiny_llama, attention_backend="CPU_ATTN")
    config = llm.llm_engine.vllm_config
    assert config.additional_config["streaming_sink"]["inner_backend"] == "CPU_ATTN"
    layer = next(iter(config.compilation_config.static_forward_context.values()))
    assert isinstance(layer.impl, SinkImpl)
    assert type(layer.impl).__name__ == "StreamingSink_CPU_ATTNImpl"
    del llm


def test_explicit_long_context_veto_refused(tiny_llama, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0")
    with pytest.raises(PolicyConfigError, match="VLLM_ALLOW_LONG_MAX_MODEL_LEN=0"):
        make_llm(tiny_llama)


def test_model_without_rope_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_models import build_tiny_llama

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=256, vocab_size=384)).save_pretrained(path)
    tok = tmp_path / "tok"
    build_tiny_llama(tok)  # borrow its tokenizer files
    for f in tok.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(PolicyConfigError, match="RoPE"):
        make_llm(str(path), block_size=BS)


def test_policy_off_changes_nothing(model, llm, stock):
    """A stock engine, built in a process that already runs a policy engine
    (vLLM shares rotary modules between models), computes plain dense attention."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    config = stock.llm_engine.vllm_config
    assert "streaming_sink" not in (config.additional_config or {})
    assert config.attention_config.backend != AttentionBackendEnum.CUSTOM
    layer = next(iter(config.compilation_config.static_forward_context.values()))
    assert type(layer.impl).__module__.startswith("vllm.")
    ids = random_ids(CONTEXT - 1, seed=5)  # past the policy's dense region, within the context
    want = OracleLlama(model, sink_tokens=None).token_logprobs(ids)
    assert (prompt_logprobs(stock, ids) - want).abs().max().item() < TOL
    assert (prompt_logprobs(llm, ids) - want)[POLICY.dense_tokens:].abs().max().item() > 1e-2
