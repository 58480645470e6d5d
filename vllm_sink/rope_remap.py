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

from streaming_sink.policy import SinkPolicy
from streaming_sink.rotary_walk import layer_rotaries, rotary_params  # noqa: F401 (rotary_params: tests)


class CachePositionRope(torch.nn.Module):
    """The model's rotary module, fed ``pos(t)`` instead of ``t``.

    A wrapper, not a patch: vLLM shares rotary modules between models of one
    process (``get_rope`` caches them), so the original must stay untouched
    for any other engine. Attribute reads fall through to the original.
    """

    def __init__(self, rope: torch.nn.Module, policy: SinkPolicy,
                 token_sinks: torch.Tensor | None = None) -> None:
        super().__init__()
        self.rope = rope
        self.policy = policy
        # Each token's S (per-request sinks, request_sinks.WorkerSinks), filled by the model
        # runner every step: a persistent buffer, so compiled graphs read its current values.
        if token_sinks is not None:
            self.register_buffer("token_sinks", token_sinks, persistent=False)
        else:
            self.token_sinks = None

    def forward(self, positions, *args, **kwargs):
        if self.token_sinks is None:
            return self.rope(self.policy.cache_position(positions), *args, **kwargs)
        sinks = self.token_sinks[:positions.shape[-1]].to(positions.dtype)
        return self.rope(self.policy.cache_position(positions, sinks), *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("rope"), name)


def install(model: torch.nn.Module, impl_cls: type, attention_cls: type,
            token_sinks: torch.Tensor | None = None) -> int:
    """Wire every ``attention_cls`` layer whose impl is ``impl_cls`` to the rotary
    module beside it (the core's walk: streaming_sink/rotary_walk.py). Returns how
    many layers were wired. ``token_sinks``: the runner's per-token S buffer."""
    def ours(m):
        return isinstance(m, attention_cls) and isinstance(m.impl, impl_cls)

    policy = next((m.impl.policy for m in model.modules() if ours(m)), None)
    if policy is None:
        return 0
    found = layer_rotaries(model, ours, policy,
                           unwrap=lambda r: r.rope if isinstance(r, CachePositionRope) else r)
    wrappers: dict[int, CachePositionRope] = {}  # one wrapper per shared rotary module
    for f in found:
        f.layer.impl.rope = f.params
        if not isinstance(f.holder.rotary_emb, CachePositionRope):
            f.holder.rotary_emb = wrappers.setdefault(
                id(f.rope), CachePositionRope(f.rope, policy, token_sinks))
    return len(found)
