"""The independent oracle, extended to GPT-OSS (``GptOssForCausalLM``).

Same rules as ``oracle.py`` (whose helpers it shares) and the same independence:
no ``streaming_sink`` import, float64, one token at a time, keys cached
*pre-RoPE* and rotated afresh every step at the positions the contract gives.
What GPT-OSS adds, each written from its definition (HF's modeling_gpt_oss):

* **learned sinks**: per query head a logit ``sink_h`` joins the softmax
  denominator (``exp(sink_h)``), with no value and no KV slot;
* **two layer types**: ``layer_types[i] == "sliding_attention"`` attends only
  keys with ``t - k < sliding_window`` (its own window, at true relative
  distances: under the policy those are the contract's window keys, never the
  sink tokens once they left its window); ``"full_attention"`` layers get the
  whole contract (sinks + block window, cache positions);
* **YaRN RoPE**: frequencies blended between extrapolation and interpolation
  (``factor``, ``original_max_position_embeddings``, ``beta_fast/slow``,
  ``truncate``), and the attention factor ``0.1 ln(factor) + 1`` applied to
  both the rotated query and key (a magnitude, never part of the rotation);
* **attention biases** on q/k/v/o;
* **MoE MLP**: router (linear + bias), top-k, softmax over the top-k logits,
  experts with the clamped SwiGLU: ``gate, up = gate_up[::2], gate_up[1::2]``,
  ``gate <= limit``, ``|up| <= limit``, ``(up + 1) * gate * sigmoid(alpha gate)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from oracle import F64, Contract, StepOracle, _attend_one, _load_safetensors, rope


def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN frequencies (float32 arithmetic, as HF and vLLM compute them), in float64."""
    def correction_dim(rotations):
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1: keep the original frequency (fast dims)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv.to(F64)


def yarn_attention_factor(factor: float, attention_factor: float | None = None) -> float:
    """YaRN's magnitude on cos/sin (``mscale``); q and k both carry it."""
    if attention_factor is not None:
        return float(attention_factor)
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


class OracleGptOss(StepOracle):
    """An HF GPT-OSS folder (unquantized safetensors) run token by token in float64
    under the contract. ``sink_tokens=None``: the policy off (dense; every layer
    sees keys ``[0, t]``, sliding layers their own window, natural positions)."""

    def __init__(self, path, sink_tokens: int | None = None, window_tokens: int = 128, block_size: int = 32):
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if sink_tokens is not None and (sink_tokens < 0 or window_tokens <= 0 or window_tokens % block_size):
            raise ValueError(f"bad policy S={sink_tokens} W={window_tokens} bs={block_size}")
        self.contract = Contract(sink_tokens, block_size, window_tokens // block_size)
        self.cfg = cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.hq, self.hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.hq
        self.eps = cfg.get("rms_norm_eps", 1e-5)
        self.top_k = cfg["num_experts_per_tok"]
        self.alpha, self.limit = cfg.get("swiglu_alpha", 1.702), cfg.get("swiglu_limit", 7.0)
        self.layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.n_layers)]
        self.sliding_window = cfg["sliding_window"]

        rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rp.get("rope_theta", cfg.get("rope_theta", 150000.0))
        if rp.get("rope_type", rp.get("type")) != "yarn":
            raise NotImplementedError(f"GPT-OSS oracle expects YaRN RoPE, got {rp}")
        factor = rp["factor"]
        self.inv_freq = yarn_inv_freq(
            self.head_dim, theta, factor, rp["original_max_position_embeddings"],
            rp.get("beta_fast") or 32.0, rp.get("beta_slow") or 1.0, rp.get("truncate", True))
        self.mscale = yarn_attention_factor(factor, rp.get("attention_factor"))

        w = {k: t.to(F64) for k, t in _load_safetensors(path).items()}
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = w["lm_head.weight"] if "lm_head.weight" in w else self.embed
        self.final_norm = w["model.norm.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            m = p + "mlp."
            self.layers.append(dict(
                ln1=w[p + "input_layernorm.weight"], ln2=w[p + "post_attention_layernorm.weight"],
                wq=w[a + "q_proj.weight"], bq=w[a + "q_proj.bias"],
                wk=w[a + "k_proj.weight"], bk=w[a + "k_proj.bias"],
                wv=w[a + "v_proj.weight"], bv=w[a + "v_proj.bias"],
                wo=w[a + "o_proj.weight"], bo=w[a + "o_proj.bias"],
                sinks=w[a + "sinks"],
                wr=w[m + "router.weight"], br=w[m + "router.bias"],
                gate_up=w[m + "experts.gate_up_proj"], gate_up_b=w[m + "experts.gate_up_proj_bias"],
                down=w[m + "experts.down_proj"], down_b=w[m + "experts.down_proj_bias"],
                sliding=self.layer_types[i] == "sliding_attention"))
        self.scale = self.head_dim ** -0.5
        self.reset()

    def _moe(self, h, L):
        logits = L["wr"] @ h + L["br"]
        top, idx = torch.topk(logits, self.top_k)
        weights = torch.softmax(top, -1)
        out = torch.zeros_like(h)
        for e, wgt in zip(idx.tolist(), weights):
            gu = h @ L["gate_up"][e] + L["gate_up_b"][e]
            gate, up = gu[0::2].clamp(max=self.limit), gu[1::2].clamp(-self.limit, self.limit)
            glu = gate * torch.sigmoid(gate * self.alpha)
            out = out + wgt * (((up + 1) * glu) @ L["down"][e] + L["down_b"][e])
        return out

    # ---- one token -----------------------------------------------------
    def step(self, token_id: int) -> torch.Tensor:
        """Feed the token at position ``self.t``; returns next-token logits (float64)."""
        t = self.t
        self._ensure(t + 1)
        a = self.contract.query(t)
        # the sliding layers' keys: the contract's keys inside their own window
        sw_kept = [(k, p) for k, p in zip(a.keys, a.key_pos) if t - k < self.sliding_window]
        attend = {False: (a.keys, a.key_pos), True: ([k for k, _ in sw_kept], [p for _, p in sw_kept])}
        hq, hkv, d = self.hq, self.hkv, self.head_dim
        x = self.embed[token_id]
        for li, L in enumerate(self.layers):
            h = self._rms(x, L["ln1"])
            q = (L["wq"] @ h + L["bq"]).view(hq, d)
            k = (L["wk"] @ h + L["bk"]).view(hkv, d)
            v = (L["wv"] @ h + L["bv"]).view(hkv, d)
            self.k_cache[li, t] = k  # pre-RoPE
            self.v_cache[li, t] = v
            keys, kpos = attend[L["sliding"]]
            idx = torch.tensor(keys, dtype=torch.long)
            kr = rope(self.k_cache[li, idx], torch.tensor(kpos), self.inv_freq) * self.mscale
            qr = rope(q, torch.tensor(a.q_pos), self.inv_freq) * self.mscale
            attn = _attend_one(qr, kr, self.v_cache[li, idx], self.scale, L["sinks"])
            x = x + L["wo"] @ attn.reshape(-1) + L["bo"]
            x = x + self._moe(self._rms(x, L["ln2"]), L)
        self.t = t + 1
        return self.lm_head @ self._rms(x, self.final_norm)
