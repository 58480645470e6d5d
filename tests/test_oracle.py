"""The oracle itself is checked against things that are not the oracle:
the contract text (hand-worked cases), HF transformers' Llama, and plain causal
softmax attention written independently (complex-number RoPE, one matmul).
"""

from __future__ import annotations

import pytest
import torch

from oracle import Contract, OracleLlama, default_inv_freq, oracle_attention, rope
from tiny_models import BOS_ID, EOS_ID, TINY_LLAMA_CONFIG, VOCAB_SIZE, build_tiny_llama

TOL = 1e-4  # HF computes RoPE cos/sin in float32: ~3e-5 on this model's logprobs


def _random_ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()


def _hf(path, dtype=torch.float64, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


@torch.no_grad()
def _hf_logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


# ---- the contract (docs/architecture.md), worked by hand -------------------
def test_contract_hand_cases():
    c = Contract(4, 16, 2)  # Sb = 1, dense for blocks 0..3 (t < 64)
    assert c.sink_blocks == 1 and c.dense_tokens() == 64
    a = c.query(63)
    assert not a.streaming and a.keys == list(range(64)) and a.key_pos == a.keys and a.q_pos == 63
    a = c.query(64)  # j = 4, ws = 32
    assert a.streaming
    assert a.keys == [0, 1, 2, 3] + list(range(32, 65))
    assert a.key_pos == [0, 1, 2, 3] + list(range(4, 37)) and a.q_pos == 36
    a = c.query(100)  # j = 6, ws = 64
    assert a.keys == [0, 1, 2, 3] + list(range(64, 101)) and a.q_pos == 4 + 36
    assert c.blocks_read(100) == [0, 4, 5, 6]
    # S = 0: plain block-granular window; S = 20 > bs: two sink blocks, the second partial
    c0 = Contract(0, 16, 1)
    assert c0.dense_tokens() == 32 and c0.query(32).keys == list(range(16, 33)) and c0.query(32).q_pos == 16
    c20 = Contract(20, 16, 1)  # Sb = 2, dense t < 64
    a = c20.query(64)  # j = 4, ws = 48
    assert a.keys == list(range(20)) + list(range(48, 65)) and a.q_pos == 20 + 16
    assert c20.blocks_read(64) == [0, 1, 3, 4]
    # policy off: always plain causal at natural positions
    off = Contract(None, 16, 1)
    a = off.query(1000)
    assert not a.streaming and a.keys == list(range(1001)) and a.q_pos == 1000
    # the largest position ever used is (Sb + Wb + 1) * bs - 1
    for cc in (c, c0, c20, Contract(5, 4, 3)):
        used = max(max(cc.query(t).key_pos + [cc.query(t).q_pos]) for t in range(400))
        assert used == cc.dense_tokens() - 1


# ---- oracle_attention vs plain causal attention --------------------------------
def _complex_rope(x, pos, inv_freq, rotary_dim, neox):
    """RoPE as complex multiplication (an independent formulation)."""
    x = x.double()
    d = rotary_dim
    r, rest = x[..., :d], x[..., d:]
    if neox:
        z = torch.complex(r[..., : d // 2], r[..., d // 2:])
    else:
        z = torch.complex(r[..., 0::2], r[..., 1::2])
    z = z * torch.polar(torch.ones_like(inv_freq), pos.double()[:, None] * inv_freq)[:, None, :]
    if neox:
        out = torch.cat([z.real, z.imag], -1)
    else:
        out = torch.stack([z.real, z.imag], -1).flatten(-2)
    return torch.cat([out, rest], -1)


def _plain_causal(q, k, v, inv_freq, rotary_dim, neox, sinks=None, sliding_window=None):
    T, hq, D = q.shape
    pos = torch.arange(T)
    qr = _complex_rope(q, pos, inv_freq, rotary_dim, neox)
    kr = _complex_rope(k, pos, inv_freq, rotary_dim, neox).repeat_interleave(hq // k.shape[1], 1)
    vv = v.double().repeat_interleave(hq // k.shape[1], 1)
    s = torch.einsum("qhd,khd->hqk", qr, kr) / D ** 0.5
    dist = pos[:, None] - pos[None, :]
    mask = dist >= 0
    if sliding_window is not None:
        mask &= dist < sliding_window
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(hq, T, 1)], -1)
    p = torch.softmax(s, -1)[..., :T]
    return torch.einsum("hqk,khd->qhd", p, vv)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim,group,learned_sinks,sw", [(32, 1, False, None), (16, 2, True, None),
                                                               (32, 4, True, 7), (16, 2, False, 20)])
def test_oracle_attention_dense_is_plain_causal(neox, rotary_dim, group, learned_sinks, sw):
    g = torch.Generator().manual_seed(rotary_dim + group)
    T, hkv, D = 70, 2, 32
    q = torch.randn(T, hkv * group, D, generator=g) * 2
    k = torch.randn(T, hkv, D, generator=g) * 2
    v = torch.randn(T, hkv, D, generator=g)
    sinks = torch.randn(hkv * group, generator=g) if learned_sinks else None
    inv = default_inv_freq(rotary_dim, 100.0)
    want = _plain_causal(q, k, v, inv, rotary_dim, neox, sinks, sw)
    for c in (Contract(None), Contract(4, 16, 4), Contract(0, 1, 69), Contract(20, 8, 8)):
        assert c.dense_tokens() >= T
        got = oracle_attention(q, k, v, contract=c, inv_freq=inv, rotary_dim=rotary_dim, neox=neox,
                               sinks=sinks, sliding_window=sw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # and the streaming regime is not plain causal
    got = oracle_attention(q, k, v, contract=Contract(4, 8, 2), inv_freq=inv, rotary_dim=rotary_dim, neox=neox,
                           sinks=sinks, sliding_window=sw)
    torch.testing.assert_close(got[:32], want[:32], rtol=1e-10, atol=1e-10)
    if sw is None or sw > 16:
        assert (got[32:] - want[32:]).abs().max() > 1e-3


def test_rope_is_relative():
    """Scores depend on q_pos - k_pos only (what makes cache positions legal)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 64, generator=g), torch.randn(1, 2, 64, generator=g)
    inv = default_inv_freq(48, 10000.0)
    for neox in (True, False):
        s = [(rope(q, torch.tensor([a + 5]), inv, 48, neox) * rope(k, torch.tensor([a]), inv, 48, neox)).sum()
             for a in (0, 17, 300)]
        assert abs(s[0] - s[1]) < 1e-10 and abs(s[0] - s[2]) < 1e-10
        assert torch.equal(rope(q, torch.tensor([9]), inv, 48, neox)[..., 48:], q[..., 48:].double())


# ---- OracleLlama vs HF transformers ---------------------------------------------
def test_tiny_model_attention_is_peaked(tiny_llama):
    """The tiny model must not average uniformly (that would hide position bugs)."""
    m = _hf(tiny_llama, attn_implementation="eager")
    with torch.no_grad():
        att = m(torch.tensor([_random_ids(200)]), output_attentions=True).attentions
    uniform = (1.0 / torch.arange(1, 201, dtype=torch.float64)).mean()
    for a in att:
        assert a.max(-1).values.mean() > 5 * uniform


def test_tiny_model_files(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert len(tok) == VOCAB_SIZE and tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    text = "Any text: ünïcödé, 日本語, \x00\t tabs & <s> markup"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and max(ids) < VOCAB_SIZE
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<s>", "")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_policy_off_equals_hf(tiny_llama, dtype):
    ids = [BOS_ID] + _random_ids(TINY_LLAMA_CONFIG["max_position_embeddings"] - 1)
    want = _hf_logprobs(_hf(tiny_llama, dtype), ids)
    got = OracleLlama(tiny_llama).logprobs(ids)
    assert got.dtype == torch.float64 and got.shape == (len(ids), VOCAB_SIZE)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("S,W,bs", [(4, 192, 32), (0, 64, 16), (20, 32, 16), (1, 5, 1)])
def test_dense_regime_equals_hf(tiny_llama, S, W, bs):
    o = OracleLlama(tiny_llama, sink_tokens=S, window_tokens=W, block_size=bs)
    n = min(o.contract.dense_tokens(), TINY_LLAMA_CONFIG["max_position_embeddings"])
    ids = _random_ids(n, seed=S)
    torch.testing.assert_close(o.logprobs(ids), _hf_logprobs(_hf(tiny_llama), ids), rtol=0, atol=TOL)


def test_tied_embeddings_equal_hf(tmp_path):
    path = build_tiny_llama(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    ids = _random_ids(64, seed=5)
    torch.testing.assert_close(OracleLlama(path).logprobs(ids), _hf_logprobs(_hf(path), ids), rtol=0, atol=TOL)


def test_streaming_one_layer_equals_hf_on_kept_tokens(tmp_path):
    """One layer: a token's K/V depend on that token only, so the contract's output at
    ``t`` equals HF run on just the attended tokens at positions 0..n-1 (sinks, then the
    window, then t). An independent check of the streaming regime's positions."""
    path = build_tiny_llama(tmp_path / "one-layer", seed=2, num_hidden_layers=1)
    S, W, bs = 4, 32, 16
    o = OracleLlama(path, sink_tokens=S, window_tokens=W, block_size=bs)
    ids = _random_ids(600, seed=7)  # > 2x max_position_embeddings
    got = o.logprobs(ids)
    hf = _hf(path)
    for t in (63, 64, 65, 79, 80, 95, 96, 97, 300, 599):
        a = o.contract.query(t)
        assert a.streaming == (t >= 64)
        want = _hf_logprobs(hf, [ids[k] for k in a.keys])[-1]
        torch.testing.assert_close(got[t], want, rtol=0, atol=TOL)


def test_qwen3_policy_off_equals_hf(tiny_qwen3):
    """Qwen3's per-head q/k RMSNorm before RoPE, as HF computes it."""
    ids = [BOS_ID] + _random_ids(TINY_LLAMA_CONFIG["max_position_embeddings"] - 1, seed=3)
    torch.testing.assert_close(OracleLlama(tiny_qwen3).logprobs(ids), _hf_logprobs(_hf(tiny_qwen3), ids),
                               rtol=0, atol=TOL)


def test_qwen3_streaming_one_layer_equals_hf_on_kept_tokens(tmp_path):
    from tiny_models import build_tiny_qwen3

    path = build_tiny_qwen3(tmp_path / "qwen3-one-layer", seed=2, num_hidden_layers=1)
    o = OracleLlama(path, sink_tokens=4, window_tokens=32, block_size=16)
    ids = _random_ids(400, seed=8)
    got, hf = o.logprobs(ids), _hf(path)
    for t in (63, 64, 80, 97, 399):
        want = _hf_logprobs(hf, [ids[k] for k in o.contract.query(t).keys])[-1]
        torch.testing.assert_close(got[t], want, rtol=0, atol=TOL)


def test_streaming_regime_is_not_dense(tiny_llama):
    S, W, bs = 4, 64, 16  # dense t < 96
    ids = [BOS_ID] + _random_ids(449, seed=11)  # well past max_position_embeddings (256)
    dense = OracleLlama(tiny_llama).logprobs(ids)
    sink4 = OracleLlama(tiny_llama, sink_tokens=S, window_tokens=W, block_size=bs).logprobs(ids)
    sink0 = OracleLlama(tiny_llama, sink_tokens=0, window_tokens=W, block_size=bs).logprobs(ids)
    for lp in (dense, sink4, sink0):
        assert torch.isfinite(lp).all()
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(ids), dtype=torch.float64))
    # identical to the stock model before the switch, different after it
    assert (sink4[:96] - dense[:96]).abs().max() < 1e-12
    assert (sink4[96:] - dense[96:]).abs().amax(-1).min() > 1e-6
    assert (sink4[96:] - dense[96:]).abs().max() > 0.1
    # sinks matter: S = 0 (dense t < 80) vs S = 4
    assert (sink0[:80] - dense[:80]).abs().max() < 1e-12
    assert (sink4[96:] - sink0[96:]).abs().amax(-1).min() > 1e-6
    assert (sink4[96:] - sink0[96:]).abs().max() > 0.1


def test_greedy_is_argmax_of_teacher_forcing(tiny_llama):
    o = OracleLlama(tiny_llama, sink_tokens=4, window_tokens=32, block_size=16)
    prompt = [BOS_ID] + _random_ids(20, seed=3)
    gen = o.greedy(prompt, 150)  # crosses the switch at t = 64
    assert len(gen) == 150 and len(set(gen)) > 20  # not stuck in a loop
    lp = o.logprobs(prompt + gen)
    assert lp[len(prompt) - 1:-1].argmax(-1).tolist() == gen


def test_bad_policy_rejected(tiny_llama):
    for kw in (dict(sink_tokens=-1), dict(sink_tokens=4, window_tokens=30, block_size=16),
               dict(sink_tokens=4, window_tokens=0, block_size=16)):
        with pytest.raises(ValueError):
            OracleLlama(tiny_llama, **kw)


# ---- GPT-OSS: the oracle extended (tests/oracle_gptoss.py) vs HF transformers ----
GPTOSS_TOL = 5e-4  # HF keeps RMSNorm and RoPE angles in float32: ~2e-4 on this model


@pytest.fixture(scope="module")
def tiny_gptoss(tmp_path_factory):
    from tiny_models import build_tiny_gptoss

    return build_tiny_gptoss(tmp_path_factory.mktemp("tiny-gptoss"))


def _hf_gptoss(path, dtype=torch.float64):
    from transformers import GptOssForCausalLM

    return GptOssForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager",
                                             attn_implementation="eager").eval()


@pytest.fixture
def hf_all_float64(monkeypatch):
    """HF GPT-OSS with its float32 islands (RMSNorm, RoPE angles) in float64: then
    any difference from the oracle is a difference of definition, not rounding."""
    from transformers.models.gpt_oss import modeling_gpt_oss as M

    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        f = position_ids[..., None].double() * self.inv_freq.double()
        return (f.cos() * self.attention_scaling).to(x.dtype), (f.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(M.GptOssRMSNorm, "forward", norm)
    monkeypatch.setattr(M.GptOssRotaryEmbedding, "forward", rotary)


def test_gptoss_yarn_matches_hf(tiny_gptoss):
    from oracle_gptoss import OracleGptOss

    hf = _hf_gptoss(tiny_gptoss).model.rotary_emb
    o = OracleGptOss(tiny_gptoss)
    assert hf.rope_type == "yarn"
    torch.testing.assert_close(o.inv_freq, hf.inv_freq.double(), rtol=0, atol=0)
    assert o.mscale == pytest.approx(hf.attention_scaling, abs=1e-15) and o.mscale > 1.1
    # YaRN really rescales some frequencies (factor 4) and keeps the fastest one
    base = 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    assert float(o.inv_freq[0]) == pytest.approx(1.0)
    assert float(o.inv_freq[-1]) == pytest.approx(float(base[-1]) / 4, rel=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_gptoss_policy_off_equals_hf(tiny_gptoss, exact, request):
    """Dense regime over the whole context (256 tokens, sliding window 32)."""
    from oracle_gptoss import OracleGptOss

    if exact:
        request.getfixturevalue("hf_all_float64")
    ids = [BOS_ID] + _random_ids(255, seed=21)
    want = _hf_logprobs(_hf_gptoss(tiny_gptoss), ids)
    got = OracleGptOss(tiny_gptoss).logprobs(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 if exact else GPTOSS_TOL)
    # and the policy's dense regime (t < 192) is the same model
    o = OracleGptOss(tiny_gptoss, sink_tokens=4, window_tokens=128, block_size=32)
    assert (o.logprobs(ids[:192]) - got[:192]).abs().max() < 1e-12


def test_gptoss_features_are_live(tiny_gptoss):
    """Not vacuous: the learned sinks, the expert clamp and the sliding window all
    change this model's outputs."""
    from oracle_gptoss import OracleGptOss

    ids = _random_ids(128, seed=22)
    ref = OracleGptOss(tiny_gptoss).logprobs(ids)
    no_sinks = OracleGptOss(tiny_gptoss)
    for L in no_sinks.layers:
        L["sinks"] = torch.full_like(L["sinks"], -torch.inf)
    no_clamp = OracleGptOss(tiny_gptoss)
    no_clamp.limit = torch.inf
    wide = OracleGptOss(tiny_gptoss)
    wide.sliding_window = 10 ** 9
    for other in (no_sinks, no_clamp, wide):
        assert (other.logprobs(ids) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_gptoss_streaming_one_layer_equals_hf_on_kept_tokens(tmp_path, layer_type, request):
    """One layer: the contract's output at ``t`` equals HF run on just the tokens the
    layer attends, at positions 0..n-1. Full layer: sinks + block window (cache
    positions). Sliding layer: its last 32 tokens only (true relative distances,
    no sink tokens), long after the stream passed max_position_embeddings."""
    from oracle_gptoss import OracleGptOss
    from tiny_models import build_tiny_gptoss

    request.getfixturevalue("hf_all_float64")
    path = build_tiny_gptoss(tmp_path / layer_type, seed=3, num_hidden_layers=1, layer_types=[layer_type])
    o = OracleGptOss(path, sink_tokens=4, window_tokens=64, block_size=32)  # dense t < 128
    ids = _random_ids(700, seed=8)
    got = o.logprobs(ids)
    hf = _hf_gptoss(path)
    for t in (20, 127, 128, 131, 159, 160, 400, 699):
        keys = o.contract.query(t).keys
        if layer_type == "sliding_attention":
            keys = [k for k in keys if t - k < 32]
            assert keys == list(range(max(0, t - 31), t + 1))
        want = _hf_logprobs(hf, [ids[k] for k in keys])[-1]
        torch.testing.assert_close(got[t], want, rtol=0, atol=1e-9)
