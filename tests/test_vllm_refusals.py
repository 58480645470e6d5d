"""Refusals listed in docs/architecture.md ("refused outright", the version gate) that no
other vLLM test reaches: each raised at startup, before vLLM builds an engine, naming
the flag. (The others: test_vllm_engine.py, test_vllm_families.py, test_vllm_hybrids.py,
test_engine_rules.py, tests/cuda_build.)"""

from __future__ import annotations

import pytest
from vllm_helpers import S, W, make_llm

from streaming_sink.policy import PolicyConfigError


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
     "does not support KV transfer / disaggregated prefill (--kv-transfer-config)"),
    (dict(decode_context_parallel_size=2), "does not support decode context parallelism"),
])
def test_unsupported_features_refused(tiny_llama, kwargs, message):
    with pytest.raises(PolicyConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_llm(tiny_llama, policy=False, kv_policy="streaming-sink", sink_tokens=S, sink_window=W, **kwargs)


# Speculative decoding: n-gram is served (test_vllm_spec_decode.py); a drafter with its own
# attention layers is refused naming its method, as is one without that no test runs.
OWN_KV = "its drafter has attention layers of its own"


@pytest.mark.parametrize("spec, message", [
    ({"method": "eagle", "model": "yuhuili/EAGLE-LLaMA3-Instruct-8B"}, f"method 'eagle': {OWN_KV}"),
    ({"method": "eagle3", "model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"}, f"method 'eagle3': {OWN_KV}"),
    ({"method": "mtp"}, f"method 'mtp': {OWN_KV}"),
    ({"method": "deepseek_mtp"}, f"method 'deepseek_mtp': {OWN_KV}"),
    ({"method": "draft_model", "model": "some/draft"}, f"method 'draft_model': {OWN_KV}"),
    ({"method": "ngram_gpu"}, "method 'ngram_gpu': its drafter is not checked under the policy"),
    ({"method": "suffix"}, "method 'suffix': its drafter is not checked under the policy"),
    ({"method": "medusa", "model": "some/medusa"}, "method 'medusa': its drafter is not checked"),
])
def test_speculative_methods_other_than_ngram_refused(tiny_llama, spec, message):
    """Refused from --speculative-config as given, before vLLM resolves (or downloads) a drafter."""
    with pytest.raises(PolicyConfigError, match=r"--kv-policy streaming-sink supports --speculative-config "
                       rf"method ngram only; {message}"):
        make_llm(tiny_llama, speculative_config={"num_speculative_tokens": 2, **spec})


def test_a_draft_model_without_a_method_refused_once_vllm_infers_it(tiny_llama):
    """No "method": vLLM infers it from the draft model (a Llama: draft_model); refused then."""
    with pytest.raises(PolicyConfigError, match=f"method 'draft_model': {OWN_KV}"):
        make_llm(tiny_llama, speculative_config={"model": tiny_llama, "num_speculative_tokens": 2})


def test_unchecked_vllm_version_refused(tiny_llama, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.0+cpu")
    with pytest.raises(PolicyConfigError, match=r"checked against vLLM 0\.32\.0 and 0\.33\.0; the installed vLLM is 0\.31\.0"):
        make_llm(tiny_llama)


# ---- per layer, when the engine builds a layer the policy cannot serve ----------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625]), "ALiBi"),
    (dict(logits_soft_cap=30.0), "logits soft-capping"),  # Gemma 2's attention soft-cap
    # per-token-head scales live in the cache: not a layout the kernels read (fp8 is served:
    # test_vllm_fp8.py)
    (dict(kv_cache_dtype="int8_per_token_head"), "KV cache dtype int8_per_token_head"),
    (dict(kv_sharing_target_layer_name="model.layers.0.self_attn.attn"), "cross-layer KV sharing"),
    (dict(attn_type="encoder"), "encoder attention"),
    (dict(attn_type="encoder_decoder"), "encoder_decoder attention"),
])
def test_layer_the_policy_cannot_serve_refused(kwargs, message):
    """The wrapped impl (the CPU_ATTN one here; every inner backend shares SinkImpl)
    refuses before anything is built, naming what the layer asks for."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from vllm_sink.backend import wrap

    args = dict(num_heads=4, head_size=32, scale=32 ** -0.5, num_kv_heads=2, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    args.update(kwargs)
    with pytest.raises(PolicyConfigError, match=f"--kv-policy streaming-sink does not support {message}"):
        wrap(CPUAttentionBackend).get_impl_cls()(**args)


def test_kv_cache_dtypes_the_policy_serves_are_accepted():
    """--kv-cache-dtype: plain floats are what they say (bfloat16 is not quantized) and
    per-tensor fp8 is served; every other vLLM cache dtype is refused naming the flag."""
    from vllm.config.cache import CacheDType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from vllm_sink.backend import wrap
    from vllm_sink.kv_layouts import check_kv_cache_dtype

    for ok in ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2", None):
        check_kv_cache_dtype(ok)
    refused = [d for d in CacheDType.__args__ if d not in ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3",
                                                            "fp8_e5m2")]
    assert "nvfp4" in refused
    for bad in refused:
        with pytest.raises(PolicyConfigError, match=f"does not support --kv-cache-dtype {bad}; it serves auto"):
            check_kv_cache_dtype(bad)
    # vLLM's backend check sees what the inner backend and the policy both serve
    assert wrap(CPUAttentionBackend).supported_kv_cache_dtypes == ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]


def test_plain_cache_dtype_other_than_the_models_refused(tiny_llama):
    """A bfloat16 cache under a float32 model: stock vLLM's CPU path already mis-serves it (its
    first greedy token differs from auto's), so the policy refuses the pair naming the flag,
    once vLLM has resolved the model's dtype; the model's own dtype, auto and fp8 pass."""
    import torch

    from vllm_sink.kv_layouts import check_kv_cache_dtype

    with pytest.raises(PolicyConfigError, match=r"^--kv-policy streaming-sink does not support "
                       r"--kv-cache-dtype bfloat16 under a float32 model .*; use auto or fp8$"):
        make_llm(tiny_llama, kv_cache_dtype="bfloat16")
    with pytest.raises(PolicyConfigError, match="--kv-cache-dtype float16 under a bfloat16 model"):
        check_kv_cache_dtype("float16", torch.bfloat16)
    for ok, model in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32),
                      ("fp8_e4m3", torch.float32), ("fp8", torch.bfloat16)):
        check_kv_cache_dtype(ok, model)


def test_kv_group_block_size_other_than_the_policys_refused():
    from vllm_sink.backend import check_block_size

    from streaming_sink.policy import SinkPolicy

    check_block_size(32, SinkPolicy(S, W, 32))  # the policy's own: fine
    with pytest.raises(PolicyConfigError, match=r"block size 64, the policy 32 \(--block-size\)"):
        check_block_size(64, SinkPolicy(S, W, 32))
