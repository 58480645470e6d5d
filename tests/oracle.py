"""The independent oracle: the streaming-sink contract written straight from
the design notes ("The contract"), in float64, token at a time.

Deliberately does NOT import ``streaming_sink`` (it is what this checks) and
uses none of its tricks: keys are cached *pre-RoPE*, one token per step, and
every step rotates the query and each attended key at the positions the
contract gives them (the reference StreamingLLM method). Nothing here is
block-granular except the contract's own ``j = t // bs``.

* ``Contract``            -- which keys a query at ``t`` attends, and at which positions.
* ``rope``                -- rotary embedding (NeoX halves or GPT-J interleaved, partial dim).
* ``oracle_attention``    -- attention over pre-RoPE q/k/v under the contract
                             (GQA, learned per-head sink logits, a layer sliding window).
* ``OracleLlama``         -- an HF Llama folder run token by token under the contract.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

F64 = torch.float64


# --------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Attend:
    """What the query at absolute position ``t`` computes."""

    t: int
    keys: list[int]  # absolute positions of the attended keys, ascending
    key_pos: list[int]  # RoPE position of each attended key, as seen by this query
    q_pos: int  # RoPE position of the query (= the position token t is written at)
    streaming: bool


@dataclass(frozen=True)
class Contract:
    """``sink_tokens=None`` is the policy off: plain causal attention, natural positions.

    Otherwise (the contract, docs/architecture.md): ``Sb = ceil(S / bs)``; a query at ``t`` lives in block
    ``j = t // bs``; dense if ``j <= Sb + Wb`` (keys ``[0, t]`` at natural positions),
    else streaming with ``ws = (j - Wb) * bs``: keys ``[0, S) + [ws, t]``, sink key
    ``k`` at ``k``, window key ``k`` at ``S + (k - ws)``, the query at ``S + (t - ws)``.
    """

    sink_tokens: int | None
    block_size: int = 16
    window_blocks: int = 1

    @property
    def off(self) -> bool:
        return self.sink_tokens is None

    @property
    def sink_blocks(self) -> int:
        return 0 if self.off else -(-self.sink_tokens // self.block_size)

    def block(self, t: int) -> int:
        return t // self.block_size

    def is_streaming(self, t: int) -> bool:
        return not self.off and self.block(t) > self.sink_blocks + self.window_blocks

    def window_start(self, t: int) -> int:
        """``ws`` of a streaming query (only defined in the streaming regime)."""
        assert self.is_streaming(t)
        return (self.block(t) - self.window_blocks) * self.block_size

    def query(self, t: int) -> Attend:
        if not self.is_streaming(t):
            keys = list(range(t + 1))
            return Attend(t, keys, list(keys), t, False)
        S, ws = self.sink_tokens, self.window_start(t)
        sinks = list(range(S))
        window = list(range(ws, t + 1))
        key_pos = sinks + [S + (k - ws) for k in window]
        return Attend(t, sinks + window, key_pos, S + (t - ws), True)

    def write_position(self, t: int) -> int:
        """RoPE position token ``t`` gets as a query at time ``t`` (its cache position
        when written: an engine writes each key rotated there)."""
        return self.query(t).q_pos

    def blocks_read(self, t: int) -> list[int]:
        """Logical blocks holding at least one key the query at ``t`` attends."""
        return sorted({k // self.block_size for k in self.query(t).keys})

    def dense_tokens(self) -> int | float:
        """First streaming position (queries before it are the stock model's)."""
        return math.inf if self.off else (self.sink_blocks + self.window_blocks + 1) * self.block_size


# --------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------
def default_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Frequencies as HF/vLLM compute them (float32 values), returned in float64."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return (1.0 / (base ** exponent)).to(F64)


def rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int | None = None,
         neox: bool = True) -> torch.Tensor:
    """Rotate ``x`` [..., H, D] by integer positions ``pos`` [...] (float64).

    Only the first ``rotary_dim`` channels rotate. NeoX pairs channel ``i`` with
    ``i + rotary_dim/2``; GPT-J pairs ``2i`` with ``2i + 1``. Pair ``i`` turns by
    ``pos * inv_freq[i]``.
    """
    x = x.to(F64)
    d = x.shape[-1] if rotary_dim is None else rotary_dim
    ang = torch.as_tensor(pos, dtype=F64)[..., None] * inv_freq.to(F64)[: d // 2]
    cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]
    rot, rest = x[..., :d], x[..., d:]
    if neox:
        a, b = rot[..., : d // 2], rot[..., d // 2:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


@contextmanager
def _one_thread():
    """Token-at-a-time ops are tiny: extra intra-op threads only spin (and crawl
    on a loaded machine)."""
    # torch._C's own setter: an in-process vLLM CPU worker replaces
    # torch.set_num_threads with a no-op after binding its threads, and two
    # spinning OpenMP threads on a shared 2-core machine made the oracle ~50x slower.
    set_threads = getattr(torch._C, "set_num_threads", torch.set_num_threads)
    n = torch.get_num_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(n)


# --------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------
def _attend_one(q, k, v, scale, sinks):
    """q [Hq, D], k/v [n, Hkv, D] (float64, already rotated) -> [Hq, D]."""
    hq, hkv = q.shape[0], k.shape[1]
    qg = q.view(hkv, hq // hkv, -1)  # query head h uses kv head h // group
    s = torch.einsum("hgd,nhd->hgn", qg, k) * scale
    if sinks is not None:
        s = torch.cat([s, sinks.to(F64).view(hkv, hq // hkv, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("hgn,nhd->hgd", p, v).reshape(hq, -1)


def oracle_attention(q, k, v, *, contract: Contract, inv_freq: torch.Tensor, rotary_dim: int | None = None,
                     neox: bool = True, scale: float | None = None, sinks: torch.Tensor | None = None,
                     sliding_window: int | None = None, query_positions=None) -> torch.Tensor:
    """Contract attention over PRE-RoPE ``q`` [T, Hq, D], ``k``/``v`` [T, Hkv, D]
    (token ``i`` at absolute position ``i``). Returns float64 [len(query_positions), Hq, D].

    Token at a time: for each query ``t``, rotate ``q[t]`` at ``q_pos`` and every
    attended key at its ``key_pos`` (fresh, from the pre-RoPE values), softmax.
    ``sinks`` [Hq]: learned logits, an extra ``exp(sink_h)`` in the denominator, no value.
    ``sliding_window``: the layer's own window, keys with ``t - k < sliding_window``,
    intersected with the contract's keys.
    """
    T, hq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    positions = range(T) if query_positions is None else query_positions
    outs = []
    with _one_thread():
        for t in positions:
            t = int(t)
            a = contract.query(t)
            keys, kpos = a.keys, a.key_pos
            if sliding_window is not None:
                kept = [(kk, p) for kk, p in zip(keys, kpos) if t - kk < sliding_window]
                keys, kpos = [kk for kk, _ in kept], [p for _, p in kept]
            idx = torch.tensor(keys, dtype=torch.long)
            kr = rope(k[idx], torch.tensor(kpos), inv_freq, rotary_dim, neox)
            qr = rope(q[t], torch.tensor(a.q_pos), inv_freq, rotary_dim, neox)
            outs.append(_attend_one(qr, kr, v[idx], scale, sinks))
    return torch.stack(outs) if outs else q.new_zeros(0, hq, D)


# --------------------------------------------------------------------------
# A Llama, token by token
# --------------------------------------------------------------------------
def check_greedy(oracle_lp: torch.Tensor, start: int, gen: list[int], lps: torch.Tensor, tol: float,
                 what: str) -> float:
    """``oracle_lp``: the oracle's next-token log-probs over a sequence holding ``gen`` at
    ``start``. The engine's logprobs are the oracle's, its tokens the oracle's argmax
    (up to float near-ties). Returns the largest logprob difference."""
    lp = oracle_lp[start - 1:start - 1 + len(gen)]
    want = lp.gather(1, torch.tensor(gen)[:, None]).squeeze(1)
    diff = (lps - want).abs()
    assert diff.max().item() < tol, f"{what}: max |engine - oracle| {diff.max():.3g} at token {diff.argmax()}"
    top2 = lp.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(lp.argmax(1)[clear], torch.tensor(gen)[clear]), what
    return diff.max().item()


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


class StepOracle:
    """Streams through a one-token ``step`` (subclasses: ``step(id)`` -> next-token logits,
    float64, reading and growing the pre-RoPE caches below; ``n_layers``, ``hkv``,
    ``head_dim``, ``eps``)."""

    def reset(self, capacity: int = 256) -> None:
        """Forget the stream (empty pre-RoPE caches)."""
        self.t = 0
        shape = (self.n_layers, capacity, self.hkv, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=F64)  # PRE-RoPE keys, by absolute position
        self.v_cache = torch.zeros(shape, dtype=F64)

    def as_cached(self, k: torch.Tensor, v: torch.Tensor, t: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ``t``'s pre-RoPE K/V [Hkv, D] in ``layer`` as the cache keeps them: exactly (a
        subclass feeds an engine's quantized cache: tests/kv_rounding.py)."""
        return k, v

    def _ensure(self, n: int) -> None:
        cap = self.k_cache.shape[1]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        pad = (0, 0, 0, 0, 0, new - cap)
        self.k_cache = torch.nn.functional.pad(self.k_cache, pad)
        self.v_cache = torch.nn.functional.pad(self.v_cache, pad)

    def _rms(self, x, wt):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * wt

    @torch.no_grad()
    def logprobs(self, token_ids) -> torch.Tensor:
        """Teacher forcing from a fresh stream: row ``i`` is ``log_softmax`` of the
        next-token logits after ``token_ids[: i + 1]``. Returns float64 [T, vocab]."""
        ids = [int(i) for i in token_ids]
        self.reset(max(len(ids), 1))
        with _one_thread():
            return torch.stack([torch.log_softmax(self.step(i), -1) for i in ids])

    def token_logprobs(self, token_ids) -> torch.Tensor:
        """``log p(token_ids[i] | token_ids[:i])`` for ``i >= 1``, float64 [T - 1]."""
        ids = [int(i) for i in token_ids]
        return self.logprobs(ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)

    @torch.no_grad()
    def greedy(self, prompt_ids, n: int) -> list[int]:
        """From a fresh stream: feed ``prompt_ids``, then decode ``n`` tokens greedily
        (argmax, lowest id on exact ties; EOS does not stop). Returns the ``n`` new ids."""
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("empty prompt")
        self.reset(len(ids) + n)
        out = []
        with _one_thread():
            for i in ids:
                logits = self.step(i)
            for _ in range(n):
                nxt = int(torch.argmax(logits))
                out.append(nxt)
                if len(out) < n:
                    logits = self.step(nxt)
        return out


class OracleLlama(StepOracle):
    """An HF ``LlamaForCausalLM`` or ``Qwen3ForCausalLM`` folder (config.json +
    safetensors) run one token at a time in float64 with a PRE-RoPE KV cache,
    attention under the contract (Qwen3: q/k RMSNorm per head before RoPE).

    ``sink_tokens=None``: policy off (plain dense causal; positions unbounded, so
    streams longer than ``max_position_embeddings`` just keep counting).
    Otherwise ``window_tokens`` must be a positive multiple of ``block_size``.
    Supports GQA, tied/untied embeddings, attention/MLP biases and the default
    RoPE (``rope_theta``); other RoPE scalings raise.
    """

    def __init__(self, path, sink_tokens: int | None = None, window_tokens: int = 64, block_size: int = 16):
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if sink_tokens is not None:
            if sink_tokens < 0 or block_size <= 0 or window_tokens <= 0 or window_tokens % block_size:
                raise ValueError(f"bad policy S={sink_tokens} W={window_tokens} bs={block_size}")
        self.contract = Contract(sink_tokens, block_size, window_tokens // block_size if block_size else 0)
        self.cfg = cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.hq = cfg["num_attention_heads"]
        self.hkv = cfg.get("num_key_value_heads") or self.hq
        self.hidden = cfg["hidden_size"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.hq
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(cfg["hidden_act"])
        rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope type {rope_type!r}")
        theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        self.inv_freq = default_inv_freq(self.head_dim, theta)

        w = {k: t.to(F64) for k, t in _load_safetensors(path).items()}
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = w.get("lm_head.weight", self.embed)
        if "lm_head.weight" not in w and not cfg.get("tie_word_embeddings", False):
            raise KeyError("lm_head.weight missing and embeddings are not tied")
        self.final_norm = w["model.norm.weight"]
        self.layers = []
        z = lambda n: torch.zeros(n, dtype=F64)  # noqa: E731
        qd, kd = self.hq * self.head_dim, self.hkv * self.head_dim
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            wqkv = torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            bqkv = torch.cat([w.get(p + f"self_attn.{n}_proj.bias", z(d)) for n, d in zip("qkv", (qd, kd, kd))])
            wgu = torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
            inter = w[p + "mlp.gate_proj.weight"].shape[0]
            bgu = torch.cat([w.get(p + "mlp.gate_proj.bias", z(inter)), w.get(p + "mlp.up_proj.bias", z(inter))])
            self.layers.append(dict(
                ln1=w[p + "input_layernorm.weight"], ln2=w[p + "post_attention_layernorm.weight"],
                wqkv=wqkv.T.contiguous(), bqkv=bqkv,
                wo=w[p + "self_attn.o_proj.weight"].T.contiguous(),
                bo=w.get(p + "self_attn.o_proj.bias", z(self.hidden)),
                wgu=wgu.T.contiguous(), bgu=bgu, inter=inter,
                wd=w[p + "mlp.down_proj.weight"].T.contiguous(),
                bd=w.get(p + "mlp.down_proj.bias", z(self.hidden)),
                # Qwen3: per-head RMSNorm of q and k, before RoPE (None: Llama)
                qn=w.get(p + "self_attn.q_norm.weight"), kn=w.get(p + "self_attn.k_norm.weight")))
        self.scale = self.head_dim ** -0.5
        self.reset()

    # ---- one token -----------------------------------------------------
    def step(self, token_id: int) -> torch.Tensor:
        """Feed the token at position ``self.t``; returns next-token logits [vocab] (float64)."""
        t = self.t
        self._ensure(t + 1)
        a = self.contract.query(t)
        idx = torch.tensor(a.keys, dtype=torch.long)
        # rotation tables for this step: keys at their contract positions, query at q_pos
        ang_k = torch.tensor(a.key_pos, dtype=F64)[:, None] * self.inv_freq
        ang_q = float(a.q_pos) * self.inv_freq
        ck, sk = ang_k.cos()[:, None, :], ang_k.sin()[:, None, :]
        cq, sq = ang_q.cos()[None, :], ang_q.sin()[None, :]
        half = self.head_dim // 2
        hq, hkv, d = self.hq, self.hkv, self.head_dim

        def rot(x, c, s):  # NeoX (rotate_half), full head_dim
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

        x = self.embed[token_id]
        for li, L in enumerate(self.layers):
            h = self._rms(x, L["ln1"])
            qkv = h @ L["wqkv"] + L["bqkv"]
            q = qkv[: hq * d].view(hq, d)
            k = qkv[hq * d: (hq + hkv) * d].view(hkv, d)
            v = qkv[(hq + hkv) * d:].view(hkv, d)
            if L["qn"] is not None:
                q, k = self._rms(q, L["qn"]), self._rms(k, L["kn"])
            self.k_cache[li, t], self.v_cache[li, t] = self.as_cached(k, v, t, li)  # pre-RoPE
            keys = rot(self.k_cache[li, idx], ck, sk)  # [n, Hkv, D], rotated fresh every step
            qr = rot(q, cq, sq)
            attn = _attend_one(qr, keys, self.v_cache[li, idx], self.scale, None)
            x = x + attn.reshape(-1) @ L["wo"] + L["bo"]
            h = self._rms(x, L["ln2"])
            gu = h @ L["wgu"] + L["bgu"]
            g, u = gu[: L["inter"]], gu[L["inter"]:]
            x = x + (torch.nn.functional.silu(g) * u) @ L["wd"] + L["bd"]
        self.t = t + 1
        return self._rms(x, self.final_norm) @ self.lm_head.T
