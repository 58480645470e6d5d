"""The extra query rotation ``R(delta)`` of the position-remap method.

Keys are written already rotated at their cache position ``pos(k)``; when the
window slides, a key must be seen ``delta`` positions lower, which is the same
score as rotating the (already rotated) query ``delta`` positions further.
This is a *pure* rotation: any magnitude scaling of the rotary embedding
(YaRN's mscale) is already inside q and k and must not be applied again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .policy import PolicyConfigError, SinkPolicy


@dataclass(frozen=True)
class RotaryParams:
    """What a kernel needs to rotate a query by ``delta`` positions."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], float32, the layer's (possibly scaled) frequencies
    rotary_dim: int
    is_neox_style: bool  # True: halves (x1 | x2); False: interleaved pairs (GPT-J)

    @classmethod
    def default(cls, rotary_dim: int, base: float = 10000.0, is_neox_style: bool = True) -> "RotaryParams":
        inv = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        return cls(inv.float(), rotary_dim, is_neox_style)


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: RotaryParams) -> torch.Tensor:
    """Rotate ``x[..., :rotary_dim]`` by ``positions`` (broadcast over x's leading
    dims except the last two: [..., heads, head_dim]). Returns float32."""
    x = x.float()
    d = rope.rotary_dim
    ang = positions.to(torch.float64)[..., None] * rope.inv_freq.to(x.device, torch.float64)
    cos = ang.cos().float()[..., None, :]  # broadcast over heads
    sin = ang.sin().float()[..., None, :]
    rot, rest = x[..., :d], x[..., d:]
    if rope.is_neox_style:
        x1, x2 = rot[..., : d // 2], rot[..., d // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest.expand(*out.shape[:-1], rest.shape[-1])], dim=-1)


def params_from_cos_sin_table(table: torch.Tensor, rotary_dim: int, is_neox_style: bool,
                              policy: SinkPolicy, name: str) -> RotaryParams:
    """A layer's pure-rotation frequencies, read off its engine's rotary table.

    ``table``: the module's float32 ``[positions, rotary_dim]`` table, cos half then
    sin half (vLLM's and SGLang's layout). The frequencies are ``atan2(sin, cos)`` at
    position 1, which drops any magnitude factor (YaRN's mscale) and covers every
    position-linear scaling (linear, NTK, Llama-3, YaRN); a table that is not such a
    rotation up to the policy's largest position is refused.
    """
    policy.check_rotary_table(table.shape[0], f"layer {name}")
    table = table.to(torch.float64)
    half = rotary_dim // 2
    cos, sin = table[:, :half], table[:, half:]
    inv_freq = torch.atan2(sin[1], cos[1])
    scale = torch.hypot(cos[1], sin[1])
    p = torch.tensor([0.0, policy.max_position], dtype=torch.float64)
    ang = p[:, None] * inv_freq
    err = max((cos[[0, policy.max_position]] - scale * ang.cos()).abs().max().item(),
              (sin[[0, policy.max_position]] - scale * ang.sin()).abs().max().item())
    if not math.isfinite(err) or err > 1e-3:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink: the rotary embedding of layer {name} is not a rotation "
            f"linear in the position; not supported")
    return RotaryParams(inv_freq.float(), rotary_dim, bool(is_neox_style))
