"""What the policy needs to know from a model's Hugging Face config, one rule each,
for every engine (both read the same ``config.json``). Engine-free: reads attributes.

* ``has_rope``: the policy keeps RoPE positions inside the cache; a model without
  rotary positions (absolute embeddings, ALiBi) is refused.
* ``rotary_table_len``: the positions the engine's rotary table holds
  (``max_position_embeddings``): the default window is the largest that fits.
* ``layer_window``: a sliding window of the model's own layers (Gemma 2/3, GPT-OSS,
  Mistral), which must fit inside the policy's window (``SinkPolicy.check_layer_window``).
* hybrids with state layers (``hybrid.state_layers``) are refused.

``check_model_config`` runs all of them, before the engine builds anything.
"""

from __future__ import annotations

from .errors import PolicyConfigError
from .hybrid import refusal, state_layers

# A layer type of ``layer_types`` whose layers have their own window (HF's name).
SLIDING_LAYER_TYPE = "sliding_attention"


def text_config(cfg):
    """The language model's config of a multimodal config (Gemma 3's ``text_config``)."""
    return getattr(cfg, "text_config", None) or cfg


def _rope_tables(cfg) -> list[dict]:
    """The rotary parameter dicts of a config: flat (``{"rope_theta": ...}``) or one per
    layer type (Gemma 3 under transformers 5: ``{"full_attention": {...}, ...}``);
    ``rope_scaling`` is the name older configs use."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    return [params, *(v for v in params.values() if isinstance(v, dict))]


def has_rope(cfg) -> bool:
    """Whether the model rotates q/k by position (any RoPE variant)."""
    cfg = text_config(cfg)
    if getattr(cfg, "alibi", False):  # Falcon's ALiBi variant
        return False
    if getattr(cfg, "rope_theta", None) is not None or getattr(cfg, "rotary_dim", None):  # GPT-J, CodeGen
        return True
    return any("rope_theta" in t or "rope_type" in t for t in _rope_tables(cfg))


def rotary_table_len(cfg) -> int:
    """Positions in the model's rotary table (0 when the config does not say)."""
    return int(getattr(text_config(cfg), "max_position_embeddings", 0) or 0)


def layer_window(cfg) -> int | None:
    """The sliding window (HF: keys with ``t - k < sliding_window``) of the model's
    own windowed layers; None when no layer has one. With ``layer_types`` only a
    ``sliding_attention`` layer has it (Qwen3 lists ``full_attention`` only); without,
    a set ``sliding_window`` applies to every layer unless ``use_sliding_window`` is off
    (Mistral on, Qwen2 off)."""
    cfg = text_config(cfg)
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        return window if SLIDING_LAYER_TYPE in types else None
    return None if getattr(cfg, "use_sliding_window", True) is False else window


def check_model_config(cfg, model: str, policy=None) -> None:
    """Refuses, naming the model, what the policy cannot serve: state-layer hybrids, no
    RoPE, and (with ``policy``) a layer window longer than ``--sink-window + 1``."""
    state = state_layers(cfg)
    if state is not None:
        raise PolicyConfigError(refusal(model, cfg, state))
    if not has_rope(cfg):
        raise PolicyConfigError(
            f"--kv-policy streaming-sink needs a RoPE model; {model} "
            f"({getattr(text_config(cfg), 'model_type', '?')}) has no rotary position embedding")
    if policy is not None:
        policy.check_layer_window(layer_window(cfg), "the model")
