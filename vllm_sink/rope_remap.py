"""Positions inside the cache: feed the model's own RoPE ``pos(t)``.

After vLLM builds the model, every rotary module that sits next to one of our
attention layers is replaced, on that model only, by a wrapper that rotates at
the cache position ``pos(t)`` of the contract instead of ``t`` (an elementwise function,
so torch.compile traces it). The same walk hands each attention layer its
rotary frequencies for the per-block query rotation, and refuses models whose
attention has no RoPE or whose rotary table is too short for the window.
"""

from __future__ import annotations

import torch

from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.rope import RotaryParams, params_from_cos_sin_table


def rotary_params(rope: torch.nn.Module, policy: SinkPolicy, name: str) -> RotaryParams:
    """Pure-rotation frequencies of a vLLM rotary module, checked against its table."""
    for attr in ("rotary_dim", "is_neox_style", "cos_sin_cache"):
        if not hasattr(rope, attr):
            raise PolicyConfigError(
                f"--kv-policy streaming-sink: layer {name} uses {type(rope).__name__}, "
                f"which is not a standard rotary embedding")
    table = rope._compute_cos_sin_cache()  # float32, before the dtype cast
    return params_from_cos_sin_table(table, rope.rotary_dim, rope.is_neox_style, policy,
                                     f"{name} ({type(rope).__name__})")


class CachePositionRope(torch.nn.Module):
    """The model's rotary module, fed ``pos(t)`` instead of ``t``.

    A wrapper, not a patch: vLLM shares rotary modules between models of one
    process (``get_rope`` caches them), so the original must stay untouched
    for any other engine. Attribute reads fall through to the original.
    """

    def __init__(self, rope: torch.nn.Module, policy: SinkPolicy) -> None:
        super().__init__()
        self.rope = rope
        self.policy = policy

    def forward(self, positions, *args, **kwargs):
        return self.rope(self.policy.cache_position(positions), *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("rope"), name)


def install(model: torch.nn.Module, impl_cls: type, attention_cls: type) -> int:
    """Wire every ``attention_cls`` layer whose impl is ``impl_cls`` to the rotary
    module beside it. Returns how many layers were wired."""
    wired: set[int] = set()
    wrappers: dict[int, CachePositionRope] = {}  # one wrapper per shared rotary module
    params: dict[int, RotaryParams] = {}  # one table read per rotary module (YaRN: 131072 rows)
    for parent_name, parent in list(model.named_modules()):
        rope = getattr(parent, "rotary_emb", None)
        if not isinstance(rope, torch.nn.Module):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, attention_cls) and isinstance(child.impl, impl_cls):
                policy = child.impl.policy
                base = rope.rope if isinstance(rope, CachePositionRope) else rope
                if id(base) not in params:
                    params[id(base)] = rotary_params(base, policy, f"{parent_name}.{child_name}")
                child.impl.rope = params[id(base)]
                if not isinstance(rope, CachePositionRope):
                    rope = wrappers.setdefault(id(rope), CachePositionRope(rope, policy))
                    parent.rotary_emb = rope
                wired.add(id(child))
    missing = [name for name, m in model.named_modules()
               if isinstance(m, attention_cls) and isinstance(m.impl, impl_cls) and id(m) not in wired]
    if missing:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink needs RoPE attention; no rotary embedding found "
            f"next to {len(missing)} attention layer(s), e.g. {missing[0]}")
    return len(wired)
