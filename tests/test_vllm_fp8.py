"""``--kv-cache-dtype`` under the policy, real vLLM CPU engine (CPU_ATTN's vec layout).

fp8 (e4m3 and e5m2, vLLM's per-tensor k/v scales): below the
window the engine is stock vLLM with the same cache dtype (==); past it, the oracle fed the
K/V the cache held (read back after each engine step, dequantized with the layer's scales,
each key rotated back from where the engine wrote it) on streams 8x the context; blocks
bounded and returned. (A plain cache in another float type than the model's is refused:
test_vllm_refusals.py.)
Tiny random Llama, fp32 model: S=4, W=128, block 32 (dense up to token 192), context 256.
"""

from __future__ import annotations

import pytest
import torch

from kv_rounding import FP8, EngineKVOracle, round_toward_zero
from oracle import OracleLlama
from vllm_helpers import BS, S, W, SamplingParams, engine_core, free_blocks, kv_manager, live_blocks, \
    assert_dense_equals_stock, make_llm, random_ids

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

@pytest.fixture(scope="module", params=["fp8_e4m3", "fp8_e5m2"])
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
    float8 views."""
    from vllm_sink.backend import SinkImpl

    layer = _first_layer(llm)
    assert isinstance(layer.impl, SinkImpl) and layer.impl.kv_dtype_name == kv_dtype
    assert llm.llm_engine.vllm_config.cache_config.cache_dtype == kv_dtype
    cache = layer.kv_cache if torch.is_tensor(layer.kv_cache) else layer.kv_cache[0]
    assert cache.dtype == torch.uint8
    assert layer.isa == "vec"
    # the same pool as stock with this cache dtype: the policy costs no KV capacity
    assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == \
        stock.llm_engine.vllm_config.cache_config.num_gpu_blocks


def test_below_the_window_equals_stock_with_the_same_kv_dtype(llm, stock):
    """Dense rows run vLLM's own CPU attention on the same quantized cache: bit-identical."""
    assert_dense_equals_stock(llm, stock, POLICY.dense_tokens)


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


# ---- past the window: the oracle fed what the cache held ----------------------------------

def prompt_logprobs_and_cache(llm, ids: list[int]):
    """Teacher-forced logprobs of ``ids`` (one request, stepped by hand) and every token's
    K/V as the engine's cache held them, read right after the step that wrote them (before
    the policy frees their block): {layer: {t: (key as written, value)}}, dequantized, float64."""
    from vllm_sink.kv_layouts import CpuAttnLayout, fp8_by_name

    engine, scheduler = llm.llm_engine, engine_core(llm).scheduler
    manager = kv_manager(llm).coordinator.single_type_managers[0]
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    layers = sorted(ctx.items(), key=lambda kv: int(kv[0].split("layers.")[1].split(".")[0]))
    kv_dtype = llm.llm_engine.vllm_config.cache_config.cache_dtype
    cached = {li: {} for li in range(len(layers))}
    engine.add_request("stream", {"prompt_token_ids": ids},
                       # 2 tokens: the request outlives the step that ends its prompt (a finished
                       # request's blocks go back at once)
                       SamplingParams(max_tokens=2, prompt_logprobs=0, temperature=0, ignore_eos=True))
    (rid,) = scheduler.requests
    done, final = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.finished else final
        req = scheduler.requests.get(rid)
        now = done if req is None else min(req.num_computed_tokens, len(ids))
        if now > done:  # this step wrote [done, now): still in live blocks
            blocks = manager.req_to_blocks[rid]
            for li, (_, layer) in enumerate(layers):
                cache = layer.kv_cache if torch.is_tensor(layer.kv_cache) else layer.kv_cache[0]
                k, v = CpuAttnLayout.views(cache)
                k, v = k.view(fp8_by_name(kv_dtype)), v.view(fp8_by_name(kv_dtype))
                ks, vs = layer._k_scale_float, layer._v_scale_float
                for t in range(done, now):
                    b = blocks[t // BS].block_id
                    cached[li][t] = (k[b, t % BS].to(torch.float64) * ks, v[b, t % BS].to(torch.float64) * vs)
            done = now
    assert done == len(ids), (done, len(ids))
    plp = final.prompt_logprobs
    return torch.tensor([plp[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float64), cached


def test_past_the_window_matches_the_oracle_fed_the_cached_kv(llm, tiny_llama, kv_dtype):
    """8x the context in 200-token chunks (edges inside blocks, one chunk across the switch at
    192): every row against the float64 oracle fed the K/V the engine's cache held. The
    oracle's own keys would round differently wherever an fp32 value lies within its float
    error of an fp8 rounding boundary (measured: ~14% of rows off by 1e-4..8e-2 as such flips
    cascade through later layers), so the oracle takes the cache's values themselves: then
    what is left is fp32 vs float64 arithmetic, held to the fp32 engine tolerance of the
    other engine tests (2e-4) on every row. An oracle ignoring the rounding is off by far more."""
    ids = random_ids(8 * CONTEXT, seed=1)
    got, cached = prompt_logprobs_and_cache(llm, ids)
    want = EngineKVOracle(tiny_llama, cached, sink_tokens=S, window_tokens=W, block_size=BS).token_logprobs(ids)
    diff = (got - want).abs()
    assert diff.max().item() < 2e-4, f"max |engine - oracle| {diff.max():.3g} at token {diff.argmax() + 1}"
    plain = OracleLlama(tiny_llama, sink_tokens=S, window_tokens=W, block_size=BS).token_logprobs(ids)
    assert (got - plain).abs().median().item() > 10 * diff.max().item()
    k0 = torch.stack([cached[0][t][0] for t in range(64)])  # fp8 values, as vLLM's write stores
    assert torch.equal(k0, round_toward_zero(k0, FP8[kv_dtype]))
