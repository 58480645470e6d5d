"""The per-layer rotary walk: which rotary module serves which attention layer, and
its frequencies for the per-block query rotation. Engine-free (torch modules only);
each adapter says which modules are its attention layers.

The rules, the same in every engine:

1. An attention layer's rotary module is the ``rotary_emb`` of the module holding the
   layer (vLLM's and SGLang's model code both call ``self.rotary_emb(positions, q, k)``
   right before ``self.attn(q, k, v)``). Gemma 3 has one per layer type, each its own base.
2. It must be a standard rotary module: ``rotary_dim``, ``is_neox_style`` and a float32
   cos|sin table from ``_compute_cos_sin_cache()`` (both engines' ``RotaryEmbedding``);
   anything else is refused naming the layer and the module's type.
3. Its frequencies are read off that table as a pure rotation that must hold up to the
   policy's largest position (``rope.params_from_cos_sin_table``), once per module:
   engines share one module between layers (YaRN's table has 131072 rows).
4. Every attention layer must have one, or the model is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import PolicyConfigError
from .rope import RotaryParams, params_from_cos_sin_table

ROTARY_ATTR = "rotary_emb"
_STANDARD = ("rotary_dim", "is_neox_style", "cos_sin_cache")


@dataclass
class LayerRotary:
    name: str  # the attention layer's module path
    layer: torch.nn.Module
    holder: torch.nn.Module  # the module whose ``rotary_emb`` serves the layer
    rope: torch.nn.Module  # that rotary module (unwrapped)
    params: RotaryParams


def rotary_params(rope: torch.nn.Module, policy, name: str) -> RotaryParams:
    """Pure-rotation frequencies of an engine's rotary module, checked against its table."""
    if not all(hasattr(rope, attr) for attr in _STANDARD):
        raise PolicyConfigError(
            f"--kv-policy streaming-sink: layer {name} uses {type(rope).__name__}, "
            f"which is not a standard rotary embedding")
    table = rope._compute_cos_sin_cache()  # float32, before any dtype cast
    return params_from_cos_sin_table(table, rope.rotary_dim, rope.is_neox_style, policy,
                                     f"{name} ({type(rope).__name__})")


def layer_rotaries(model: torch.nn.Module, is_attention: Callable[[torch.nn.Module], bool], policy,
                   unwrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> list[LayerRotary]:
    """Every attention layer of ``model`` (``is_attention``) with its rotary module and
    frequencies; refuses a model where one has none. ``unwrap``: the engine's rotary
    module inside an adapter's wrapper (a walk may run again on a wrapped model)."""
    found: list[LayerRotary] = []
    params: dict[int, RotaryParams] = {}  # one table read per rotary module
    for holder_name, holder in list(model.named_modules()):
        rope = getattr(holder, ROTARY_ATTR, None)
        if not isinstance(rope, torch.nn.Module):
            continue
        rope = unwrap(rope)
        for child_name, child in holder.named_children():
            if not is_attention(child):
                continue
            name = f"{holder_name}.{child_name}" if holder_name else child_name
            if id(rope) not in params:
                params[id(rope)] = rotary_params(rope, policy, name)
            found.append(LayerRotary(name, child, holder, rope, params[id(rope)]))
    wired = {id(f.layer) for f in found}
    missing = [name for name, m in model.named_modules() if is_attention(m) and id(m) not in wired]
    if missing:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink needs RoPE attention; no rotary embedding found "
            f"next to {len(missing)} attention layer(s), e.g. {missing[0]}")
    return found
