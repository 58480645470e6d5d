"""The Gemma 3 oracle (tests/oracle_gemma3.py) against HF transformers' Gemma3ForCausalLM:
dense (policy off) over the whole context, the policy's dense regime, each feature live,
and the one-layer streaming trick for a global and a sliding layer."""

from __future__ import annotations

import pytest
import torch

from oracle_gemma3 import OracleGemma3
from tiny_models import BOS_ID, VOCAB_SIZE, build_tiny_gemma3

TOL = 5e-4  # HF as shipped: float32 RMSNorm and RoPE angles


def _random_ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")  # eager: float32 softmax.eval()


@torch.no_grad()
def _hf_logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> str:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture
def hf_all_float64(monkeypatch):
    """HF Gemma 3 with its float32 islands (RMSNorm, RoPE angles) in float64: then any
    difference from the oracle is a difference of definition, not rounding."""
    from transformers.models.gemma3 import modeling_gemma3 as M

    def norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    def rotary(self, x, position_ids, layer_type):
        inv_freq = getattr(self, f"{layer_type}_inv_freq").double()
        scaling = getattr(self, f"{layer_type}_attention_scaling")
        f = position_ids[..., None].double() * inv_freq
        emb = torch.cat((f, f), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)

    monkeypatch.setattr(M.Gemma3RMSNorm, "forward", norm)
    monkeypatch.setattr(M.Gemma3RotaryEmbedding, "forward", rotary)


def test_two_rope_bases_match_hf(tiny_gemma3):
    hf = _hf(tiny_gemma3).model.rotary_emb
    o = OracleGemma3(tiny_gemma3)
    for kind, base in (("sliding_attention", 1e4), ("full_attention", 1e6)):
        torch.testing.assert_close(o.inv_freq[kind], getattr(hf, f"{kind}_inv_freq").double(), rtol=0, atol=0)
        assert float(o.inv_freq[kind][-1]) == pytest.approx(base ** (-30 / 32), rel=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_policy_off_equals_hf(tiny_gemma3, exact, request):
    """Dense over the whole context (256 tokens; the sliding layers' window is 32)."""
    if exact:
        request.getfixturevalue("hf_all_float64")
    ids = [BOS_ID] + _random_ids(255, seed=21)
    want = _hf_logprobs(_hf(tiny_gemma3), ids)
    got = OracleGemma3(tiny_gemma3).logprobs(ids)
    diff = (got - want).abs().max().item()
    print(f"\noracle vs HF Gemma3 ({'float64 islands' if exact else 'as shipped'}): max {diff:.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 if exact else TOL)
    # the policy's dense regime (t < 192 for S=4, W=128, bs=32) is the same model
    o = OracleGemma3(tiny_gemma3, sink_tokens=4, window_tokens=128, block_size=32)
    assert (o.logprobs(ids[:192]) - got[:192]).abs().max() < 1e-12


def test_gemma3_features_are_live(tiny_gemma3):
    """Not vacuous: the soft-cap, the scale, the q/k norms, the two RoPE bases and the
    sliding window each change this model's outputs."""
    ids = _random_ids(128, seed=22)
    ref = OracleGemma3(tiny_gemma3).logprobs(ids)
    variants = {k: OracleGemma3(tiny_gemma3) for k in ("cap", "scale", "qknorm", "bases", "window")}
    variants["cap"].softcap = None
    variants["scale"].scale = 32 ** -0.5
    for L in variants["qknorm"].layers:
        L["qn"], L["kn"] = torch.zeros_like(L["qn"]), torch.zeros_like(L["kn"])
    v = variants["bases"]
    v.inv_freq = {"sliding_attention": v.inv_freq["full_attention"], "full_attention": v.inv_freq["sliding_attention"]}
    variants["window"].sliding_window = 10 ** 9
    for name, other in variants.items():
        assert (other.logprobs(ids) - ref).abs().max() > 1e-2, name


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_streaming_one_layer_equals_hf_on_kept_tokens(tmp_path, layer_type, request):
    """One layer: a token's K/V depend on that token only, so the contract's output at
    ``t`` equals HF run on just the attended tokens at positions 0..n-1. Global layer:
    sinks + block window (cache positions, RoPE base 1e6). Sliding layer: its last 32
    tokens only (true distances, base 1e4), long after the stream passed the context."""
    request.getfixturevalue("hf_all_float64")
    path = build_tiny_gemma3(tmp_path / layer_type, seed=3, num_hidden_layers=1, layer_types=[layer_type])
    o = OracleGemma3(path, sink_tokens=4, window_tokens=64, block_size=32)  # dense t < 128
    ids = _random_ids(700, seed=8)
    got = o.logprobs(ids)
    hf = _hf(path)
    for t in (20, 127, 128, 131, 159, 160, 400, 699):
        keys = o.contract.query(t).keys
        if layer_type == "sliding_attention":
            keys = [k for k in keys if t - k < 32]
            assert keys == list(range(max(0, t - 31), t + 1))
        want = _hf_logprobs(hf, [ids[k] for k in keys])[-1]
        torch.testing.assert_close(got[t], want, rtol=0, atol=1e-9)
