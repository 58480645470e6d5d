"""Refusals listed in docs/architecture.md ("refused outright", the version gate) that no
other vLLM test reaches: each raised at startup, before vLLM builds an engine, naming
the flag. (The others: test_vllm_engine.py, test_vllm_families.py, test_vllm_hybrids.py,
test_engine_rules.py, tests/cuda_build.)"""

from __future__ import annotations

import pytest
from vllm_helpers import S, W, make_llm

from streaming_sink.policy import PolicyConfigError


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}),
     "does not support speculative decoding (--speculative-config)"),
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
     "does not support KV transfer / disaggregated prefill (--kv-transfer-config)"),
    (dict(decode_context_parallel_size=2), "does not support decode context parallelism"),
])
def test_unsupported_features_refused(tiny_llama, kwargs, message):
    with pytest.raises(PolicyConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_llm(tiny_llama, policy=False, kv_policy="streaming-sink", sink_tokens=S, sink_window=W, **kwargs)


def test_unchecked_vllm_version_refused(tiny_llama, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.0+cpu")
    with pytest.raises(PolicyConfigError, match=r"checked against vLLM 0\.32\.0 and 0\.33\.0; the installed vLLM is 0\.31\.0"):
        make_llm(tiny_llama)
