"""Models whose layers are not all softmax attention (linear-attention / SSM hybrids).

The policy is StreamingLLM's: a window over the softmax-attention KV cache. State layers
(Mamba, Gated DeltaNet, short convolutions) carry a fixed-size state and need no window,
but each engine manages their state beside the attention KV cache (vLLM: MambaSpec KV
cache groups aligned with the attention groups; SGLang: a separate Mamba pool), and the
adapters do not handle that yet: ``--kv-policy streaming-sink`` refuses such models at
startup (docs/models.md). Engine-independent: reads only the HF config.
"""

from __future__ import annotations

from collections import Counter

SOFTMAX_LAYER_TYPES = {"attention", "full_attention", "sliding_attention", "chunked_attention", "*"}
_STATE_KEYS = ("mamba_d_state", "mamba_n_heads", "mamba_num_heads", "linear_conv_kernel_dim",
               "ssm_cfg", "state_size", "conv_L_cache", "attn_layer_period", "hybrid_override_pattern")


def state_layers(cfg) -> str | None:
    """What in ``cfg`` (an HF config or its text config) is not softmax attention, in
    words; None for a model of attention layers only."""
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("layer_types", "layers_block_type"):
        types = getattr(cfg, key, None)
        if isinstance(types, (list, tuple)) and types:
            other = Counter(str(t) for t in types if str(t) not in SOFTMAX_LAYER_TYPES
                            and str(t) not in ("mlp", "moe", "-"))
            if other:
                kinds = ", ".join(f"{n} {t}" for t, n in other.items())
                return f"{kinds} of {len(types)} layers ({key})"
            return None
    found = [k for k in _STATE_KEYS if getattr(cfg, k, None) is not None]
    return f"state (Mamba / SSM) layers ({', '.join(found)} set)" if found else None


def refusal(model: str, cfg, state: str) -> str:
    cfg = getattr(cfg, "text_config", None) or cfg
    arch = ", ".join(getattr(cfg, "architectures", None) or []) or "?"
    return (f"--kv-policy streaming-sink does not support hybrid models with linear-attention / "
            f"state-space layers yet: {model} ({getattr(cfg, 'model_type', '?')}, {arch}) has {state}. "
            f"Those layers keep a fixed-size state and need no window, but the engine manages that "
            f"state beside the attention KV cache and the policy does not handle it (docs/models.md); "
            f"run this model without --kv-policy")
