"""The independent oracle, extended to Gemma 3 (text-only ``Gemma3ForCausalLM``).

Same rules as ``oracle.py`` (whose contract and helpers it shares) and the same
independence: no ``streaming_sink`` import, float64, one token at a time, keys
cached *pre-RoPE* and rotated afresh every step at the positions the contract
gives. What Gemma 3 adds, each written from its definition (HF's modeling_gemma3):

* **embedding scaled** by ``sqrt(hidden_size)`` on input; the LM head is the tied
  (unscaled) embedding matrix;
* **RMSNorm** ``x / rms(x) * (1 + w)`` (Gemma stores ``w`` around 0), used as
  *sandwich* norms: ``input`` and ``post_attention`` around attention,
  ``pre_feedforward`` and ``post_feedforward`` around the MLP, each branch
  normed before it joins the residual; and per head on q and k before RoPE;
* **attention scale** ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``);
* **two layer types** with **their own RoPE base**: ``sliding_attention`` layers
  (``rope_parameters["sliding_attention"]``, Gemma 3: 1e4) attend only keys with
  ``t - k < sliding_window`` (true relative distances: under the policy those are
  the contract's window keys, never the sink tokens once they left the window);
  ``full_attention`` layers (Gemma 3: 1e6) get the whole contract (sinks + block
  window, cache positions);
* **gelu-tanh MLP** ``down(gelu_tanh(gate(x)) * up(x))``;
* **final logit soft-capping** ``cap * tanh(logits / cap)`` when the config sets
  ``final_logit_softcapping`` (Gemma 3 ships ``null``; Gemma 2 used 30).
  ``attn_logit_softcapping`` is refused: neither HF's Gemma 3 (5.19) nor vLLM's
  applies it, so there is no definition to check against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from oracle import F64, Contract, StepOracle, _attend_one, _load_safetensors, default_inv_freq, rope


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class OracleGemma3(StepOracle):
    """An HF Gemma 3 text folder (safetensors) run token by token in float64 under
    the contract. ``sink_tokens=None``: the policy off (dense; full layers see keys
    ``[0, t]``, sliding layers their own window, natural positions)."""

    def __init__(self, path, sink_tokens: int | None = None, window_tokens: int = 128, block_size: int = 32):
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        if sink_tokens is not None and (sink_tokens < 0 or window_tokens <= 0 or window_tokens % block_size):
            raise ValueError(f"bad policy S={sink_tokens} W={window_tokens} bs={block_size}")
        if cfg.get("attn_logit_softcapping") is not None:
            raise NotImplementedError("attn_logit_softcapping (not applied by HF's or vLLM's Gemma 3)")
        if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise NotImplementedError(cfg["hidden_activation"])
        if cfg.get("use_bidirectional_attention"):
            raise NotImplementedError("bidirectional attention")
        self.contract = Contract(sink_tokens, block_size, window_tokens // block_size)
        self.cfg = cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.hq, self.hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.hq
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.layer_types = cfg["layer_types"]
        self.sliding_window = cfg["sliding_window"]
        self.scale = float(cfg["query_pre_attn_scalar"]) ** -0.5
        self.softcap = cfg.get("final_logit_softcapping")
        self.embed_scale = math.sqrt(self.hidden)

        rp = cfg["rope_parameters"]
        self.inv_freq = {}
        for kind in ("sliding_attention", "full_attention"):
            p = rp[kind]
            if p.get("rope_type", "default") != "default":
                raise NotImplementedError(f"{kind}: rope type {p.get('rope_type')!r}")
            self.inv_freq[kind] = default_inv_freq(self.head_dim, p["rope_theta"])

        w = {k.removeprefix("language_model."): t.to(F64) for k, t in _load_safetensors(path).items()}
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = w.get("lm_head.weight", self.embed)
        self.final_norm = w["model.norm.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(dict(
                ln_in=w[p + "input_layernorm.weight"], ln_post_attn=w[p + "post_attention_layernorm.weight"],
                ln_pre_ff=w[p + "pre_feedforward_layernorm.weight"],
                ln_post_ff=w[p + "post_feedforward_layernorm.weight"],
                wq=w[a + "q_proj.weight"], wk=w[a + "k_proj.weight"], wv=w[a + "v_proj.weight"],
                wo=w[a + "o_proj.weight"], qn=w[a + "q_norm.weight"], kn=w[a + "k_norm.weight"],
                wg=w[p + "mlp.gate_proj.weight"], wu=w[p + "mlp.up_proj.weight"], wd=w[p + "mlp.down_proj.weight"],
                kind=self.layer_types[i]))
        self.reset()

    def _rms(self, x, wt):  # Gemma: (1 + w)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + wt)

    # ---- one token -----------------------------------------------------
    def step(self, token_id: int) -> torch.Tensor:
        """Feed the token at position ``self.t``; returns next-token logits (float64)."""
        t = self.t
        self._ensure(t + 1)
        a = self.contract.query(t)
        sw_kept = [(k, p) for k, p in zip(a.keys, a.key_pos) if t - k < self.sliding_window]
        attend = {"full_attention": (a.keys, a.key_pos),
                  "sliding_attention": ([k for k, _ in sw_kept], [p for _, p in sw_kept])}
        hq, hkv, d = self.hq, self.hkv, self.head_dim
        x = self.embed[token_id] * self.embed_scale
        for li, L in enumerate(self.layers):
            h = self._rms(x, L["ln_in"])
            q = self._rms((L["wq"] @ h).view(hq, d), L["qn"])
            k = self._rms((L["wk"] @ h).view(hkv, d), L["kn"])
            v = (L["wv"] @ h).view(hkv, d)
            self.k_cache[li, t] = k  # pre-RoPE (after the k norm)
            self.v_cache[li, t] = v
            keys, kpos = attend[L["kind"]]
            inv_freq = self.inv_freq[L["kind"]]
            idx = torch.tensor(keys, dtype=torch.long)
            kr = rope(self.k_cache[li, idx], torch.tensor(kpos), inv_freq)
            qr = rope(q, torch.tensor(a.q_pos), inv_freq)
            attn = _attend_one(qr, kr, self.v_cache[li, idx], self.scale, None)
            x = x + self._rms(L["wo"] @ attn.reshape(-1), L["ln_post_attn"])
            h = self._rms(x, L["ln_pre_ff"])
            m = L["wd"] @ (gelu_tanh(L["wg"] @ h) * (L["wu"] @ h))
            x = x + self._rms(m, L["ln_post_ff"])
        self.t = t + 1
        logits = self.lm_head @ self._rms(x, self.final_norm)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits
