"""``--kv-cache-dtype`` under the policy, real vLLM CPU engine (CPU_ATTN's vec layout).

fp8 (e4m3 and e5m2, vLLM's per-tensor k/v scales) and plain bfloat16 caches: below the
window the engine is stock vLLM with the same cache dtype (==); past it, the oracle fed the
K/V the cache holds (each key rotated to where the engine writes it, rounded as vLLM's
cache write rounds, rotated back) on streams 8x the context; blocks bounded and returned.
Tiny random Llama, fp32 model: S=4, W=128, block 32 (dense up to token 192), context 256.
"""

from __future__ import annotations

import pytest
import torch

from kv_rounding import FP8, CachedKVOracle, round_bf16, round_toward_zero
from vllm_helpers import BS, S, W, SamplingParams, free_blocks, live_blocks, make_llm, \
    prompt_logprobs, random_ids

from streaming_sink.policy import SinkPolicy

CONTEXT = 256
POLICY = SinkPolicy(S, W, BS)


def test_cpu_cache_write_rounds_toward_zero():
    """vLLM's own CPU cache write (``cpu_attn_reshape_and_cache``, vec ISA) stores
    ``round_toward_zero(x / scale)``: the rounding the oracle below is fed. Read back
    through the adapter's views (kv_layouts.CpuAttnLayout: keys dim-major, values
    token-major), so this also pins the layout of an fp8 cache."""
    from vllm import _custom_ops as ops

    from vllm_sink.kv_layouts import CpuAttnLayout, fp8_by_name

    g = torch.Generator().manual_seed(0)
    nb, hkv, bs, d, n = 3, 2, 32, 64, 70
    for name in FP8:
        for scale in (1.0, 0.037, 3.0):
            kv = torch.zeros(nb, hkv, bs, 2 * d, dtype=torch.uint8)
            key_cache, value_cache = kv.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
            key = torch.randn(n, hkv, d, generator=g) * 4
            key[0, 0, :3] = torch.tensor([1e4, -1e-5, 0.0])  # saturates; underflows to zero
            value = torch.randn(n, hkv, d, generator=g)
            slots = torch.randperm(nb * bs, generator=g)[:n]
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, "vec",
                                           k_scale=scale, v_scale=2 * scale, kv_cache_dtype=name)
            k8, v8 = (c.view(fp8_by_name(name)) for c in CpuAttnLayout.views(kv))
            got_k = k8.reshape(nb * bs, hkv, d)[slots].to(torch.float64) * scale
            got_v = v8.reshape(nb * bs, hkv, d)[slots].to(torch.float64) * 2 * scale
            assert torch.equal(got_k, round_toward_zero(key, FP8[name], scale)), (name, scale)
            assert torch.equal(got_v, round_toward_zero(value, FP8[name], 2 * scale)), (name, scale)
            # not round-to-nearest: a model of the cache that used torch's cast would be wrong
            rne = (key / scale).to(FP8[name]).to(torch.float64) * scale
            assert (rne != got_k).float().mean() > 0.2


# ---- engines: one policy + one stock engine per cache dtype -------------------------------

@pytest.fixture(scope="module", params=["fp8_e4m3", "fp8_e5m2", "bfloat16"])
def kv_dtype(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def llm(tiny_llama, kv_dtype):
    engine = make_llm(tiny_llama, kv_cache_dtype=kv_dtype)
    yield engine
    del engine


@pytest.fixture(scope="module")
def stock(tiny_llama, kv_dtype, llm):
    engine = make_llm(tiny_llama, policy=False, kv_cache_dtype=kv_dtype)
    yield engine
    del engine


def _first_layer(llm):
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    return next(iter(ctx.values()))


def test_cache_is_the_dtype_asked_for(llm, stock, kv_dtype):
    """The policy engine serves the cache dtype it was given (not refused, not overridden):
    fp8 is vLLM's uint8 cache in CPU_ATTN's vec layout, read by the streaming kernel through
    float8 views; bfloat16 is a bf16 cache under an fp32 model (not quantized)."""
    from vllm_sink.backend import SinkImpl

    layer = _first_layer(llm)
    assert isinstance(layer.impl, SinkImpl) and layer.impl.kv_dtype_name == kv_dtype
    assert llm.llm_engine.vllm_config.cache_config.cache_dtype == kv_dtype
    cache = layer.kv_cache if torch.is_tensor(layer.kv_cache) else layer.kv_cache[0]
    assert cache.dtype == (torch.uint8 if kv_dtype in FP8 else torch.bfloat16)
    assert layer.isa == "vec"
    # the same pool as stock with this cache dtype: the policy costs no KV capacity
    assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == \
        stock.llm_engine.vllm_config.cache_config.num_gpu_blocks


def test_below_the_window_equals_stock_with_the_same_kv_dtype(llm, stock):
    """Dense rows run vLLM's own CPU attention on the same quantized cache: bit-identical."""
    prompts = [random_ids(n, seed=20 + n) for n in (5, 64, 120)]
    params = SamplingParams(max_tokens=POLICY.dense_tokens - 121, temperature=0, ignore_eos=True, logprobs=0)
    ours = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    theirs = stock.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for a, b in zip(ours, theirs):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        la = [d[t].logprob for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lb = [d[t].logprob for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        assert la == lb
    ids = random_ids(POLICY.dense_tokens, seed=7)  # prompt logprobs: prefill in chunks, all dense
    assert torch.equal(prompt_logprobs(llm, ids), prompt_logprobs(stock, ids))


def test_live_blocks_bounded_and_all_returned(llm):
    start = free_blocks(llm)
    engine = llm.llm_engine
    for rid, n in (("a", 40), ("b", 700)):
        engine.add_request(rid, {"prompt_token_ids": random_ids(n, seed=n)},
                           SamplingParams(max_tokens=3 * CONTEXT, temperature=0, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max([peak, *live_blocks(llm).values()])
    assert POLICY.sink_blocks + POLICY.window_blocks < peak <= POLICY.max_live_blocks(200)
    assert free_blocks(llm) == start
