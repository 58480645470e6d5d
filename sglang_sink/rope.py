"""A rotary module's frequencies as the core's ``RotaryParams``, checked.

Same method as vllm_sink/rope_remap.py:rotary_params (a candidate for the core):
read the frequencies off the module's own float32 cos/sin table at position 1
(``atan2(sin, cos)``), which drops any magnitude factor (YaRN) and covers every
position-linear scaling; refuse tables that are not such a rotation.
"""

from __future__ import annotations

import math

import torch

from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.rope import RotaryParams


def rotary_params(table: torch.Tensor, rotary_dim: int, is_neox_style: bool,
                  policy: SinkPolicy, name: str) -> RotaryParams:
    """``table``: the module's [positions, rotary_dim] table, cos half then sin half."""
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
