"""What the policy needs of a model's HF config, read before SGLang builds anything
(touch point 1, flags.py): RoPE present (and its table's length), no linear-attention /
SSM state layers, layer windows that fit ``--sink-window + 1``. Engine-free (transformers
only); the backend checks the built layers again (backend.layer_ropes).
"""

from __future__ import annotations

from streaming_sink.policy import PolicyConfigError, SinkPolicy


def _config(model_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


def architectures(model_path: str) -> list[str]:
    return list(getattr(_config(model_path), "architectures", None) or ())


def refuse_state_layers(model_path: str) -> None:
    """Linear-attention / SSM hybrids (Qwen3-Next, Falcon-H1, NemotronH, ...): SGLang keeps
    their state in a Mamba pool beside the KV pool, which the policy does not handle."""
    from streaming_sink.hybrid import refusal, state_layers

    cfg = _config(model_path)
    state = state_layers(cfg)
    if state is not None:
        raise PolicyConfigError(refusal(model_path, cfg, state))


def refuse_long_layer_windows(model_path: str, policy: SinkPolicy) -> None:
    """A layer type with its own sliding window (Gemma 3, GPT-OSS: ``layer_types`` has
    ``sliding_attention``; HF's window = keys with ``t - k < sliding_window``) must fit
    ``--sink-window + 1`` (``SinkPolicy.check_layer_window``). The backend checks the
    built layers again (``backend.layer_ropes``)."""
    cfg = _config(model_path)
    cfg = getattr(cfg, "text_config", None) or cfg
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        policy.check_layer_window(getattr(cfg, "sliding_window", None), "a sliding_attention layer")


def rotary_table_len(model_path: str) -> int:
    """The model's rotary table (max_position_embeddings); refuses models without RoPE."""
    cfg = _config(model_path)
    cfg = getattr(cfg, "text_config", None) or cfg
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    # Flat ({"rope_theta": ...}) or nested per layer type (Gemma 3 under transformers 5:
    # {"full_attention": {...}, "sliding_attention": {...}}).
    tables = [params, *(v for v in params.values() if isinstance(v, dict))] if isinstance(params, dict) else []
    has_rope = getattr(cfg, "rope_theta", None) is not None or any(
        "rope_theta" in t or "rope_type" in t for t in tables)
    if not has_rope:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink needs a RoPE model; {model_path} "
            f"({getattr(cfg, 'model_type', '?')}) has no rotary position embedding")
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)
