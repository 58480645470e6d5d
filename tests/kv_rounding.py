"""What an engine's KV cache holds of a token's K/V, for the oracle (tests/oracle.py) to be
fed the same: rounding functions pinned against each engine's own cache write
(tests/test_vllm_fp8.py, tests/sglang/test_sglang_fp8.py) and the oracle that applies them.
No engine imports: both venvs use it."""

from __future__ import annotations

import torch

from oracle import OracleLlama, rope

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _magnitudes(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of a float8 dtype, ascending (float64)."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float64)
    return vals[torch.isfinite(vals) & (vals >= 0)].unique()


def round_toward_zero(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x`` through a CPU_ATTN fp8 cache slot: ``x / scale`` rounded toward zero to ``dtype``
    (saturating at its largest finite value), times ``scale``; float64."""
    mags = _magnitudes(dtype)
    a = (x.to(torch.float64) / scale).abs().clamp(max=mags[-1].item())
    idx = torch.searchsorted(mags, a.contiguous(), right=True) - 1
    return torch.sign(x.to(torch.float64)) * mags[idx] * scale


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


class CachedKVOracle(OracleLlama):
    """The oracle, fed each token's K/V as the engine's cache holds them. The engine writes
    a key rotated at its write position ``p`` (its natural position while dense, ``pos(t)``
    past the window) and rounds that; the oracle keeps pre-RoPE keys, so it stores
    ``R(-p) round(R(p) k)``, which it rotates to each attended position as always."""

    def __init__(self, path, round_kv, **kwargs):
        super().__init__(path, **kwargs)
        self.round_kv = round_kv

    def as_cached(self, k, v, t, layer):
        p = self.contract.write_position(t)
        k_rot = rope(k, p, self.inv_freq)
        return rope(self.round_kv(k_rot), -p, self.inv_freq), self.round_kv(v)


class EngineKVOracle(OracleLlama):
    """The oracle fed the very K/V an engine's cache held: ``cached[layer][t]`` = (the key
    as written, rotated at its write position; the value), read back from the cache and
    dequantized. Everything else (queries, softmax, MLPs) is the oracle's own float64, so
    the engine must match it at float tolerance on every row; rounding-boundary cases
    (an fp32 value rounding to another fp8 value than its float64 twin) cannot differ."""

    def __init__(self, path, cached: dict[int, dict[int, tuple]], **kwargs):
        super().__init__(path, **kwargs)
        self.cached = cached

    def as_cached(self, k, v, t, layer):
        k_rot, v_cached = self.cached[layer][t]
        return rope(k_rot, -self.contract.write_position(t), self.inv_freq), v_cached.to(torch.float64)
