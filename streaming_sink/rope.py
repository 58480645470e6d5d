"""The extra query rotation ``R(delta)`` of the position-remap method.

Keys are written already rotated at their cache position ``pos(k)``; when the
window slides, a key must be seen ``delta`` positions lower, which is the same
score as rotating the (already rotated) query ``delta`` positions further.
This is a *pure* rotation: any magnitude scaling of the rotary embedding
(YaRN's mscale) is already inside q and k and must not be applied again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
