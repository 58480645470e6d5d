"""Linear-attention / SSM hybrids under vLLM: refused with the policy, at startup.

vLLM's CPU build runs a tiny random Qwen3-Next (Gated DeltaNet + gated softmax attention)
without the policy, in bfloat16 (its CPU GDN kernel requires BF16 and linear head dim 128);
Jamba fails there on its own (no ``selective_scan_fwd`` CPU op). With
``--kv-policy streaming-sink`` both are refused before the engine is built, naming the
model type and why (docs/models.md).
"""

from __future__ import annotations

import pytest

from vllm_helpers import make_llm

from streaming_sink.policy import PolicyConfigError


@pytest.mark.parametrize("kind, arch", [("qwen3_next", "Qwen3NextForCausalLM"), ("jamba", "JambaForCausalLM")])
def test_hybrid_refused_at_startup(tmp_path, kind, arch):
    from tiny_hybrids import build_tiny_hybrid

    path = build_tiny_hybrid(tmp_path / kind, kind)
    with pytest.raises(PolicyConfigError) as err:
        make_llm(path, dtype="bfloat16", sink_window=64)
    msg = str(err.value)
    assert f"({kind}, {arch})" in msg and "linear-attention / state-space" in msg, msg
    assert "without --kv-policy" in msg


@pytest.mark.parametrize("name, hybrid", [
    ("FalconH1Config", True), ("NemotronHConfig", True), ("BambaConfig", True),
    ("GraniteMoeHybridConfig", True), ("Qwen3NextConfig", True), ("JambaConfig", True),
    ("LlamaConfig", False), ("Qwen3Config", False), ("GptOssConfig", False), ("Gemma3TextConfig", False),
])
def test_state_layers_detected_from_hf_configs(name, hybrid):
    import transformers

    from streaming_sink.hybrid import state_layers

    assert (state_layers(getattr(transformers, name)()) is not None) == hybrid
