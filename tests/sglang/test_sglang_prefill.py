"""``sglang_sink.prefill.chunk_attention`` (prefill chunks at page size 1, one rotation per
key) against the core's torch reference of the contract (``paged_attention_ref``), on a
token pool laid out as SGLang's: slots in a shuffled order, the recycled gap's slots
holding NaN (a read of one would show). Chunks before, across and past the
dense->streaming switch; no sinks, many sinks; GQA; NeoX and GPT-J styles, partial
rotary; learned sinks; a layer window of its own; bf16.
"""

import pytest
import torch

from sglang_helpers import CHUNK

from sglang_sink.backend import PREFILL_MIN_QUERIES
from sglang_sink.prefill import TILE, chunk_attention
from streaming_sink.policy import SinkPolicy
from streaming_sink.reference_attention import paged_attention_ref
from streaming_sink.rope import RotaryParams, rotate

HQ, HKV, D = 4, 2, 32


def _case(s, w, first_t, n, rotary_dim=D, neox=True, sinks=False, layer_window=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(first_t * 7 + n)
    policy, rope = SinkPolicy(s, w, 1), RotaryParams.default(rotary_dim, 10000.0, neox)
    total, slots_n = first_t + n, first_t + n + 37
    slots = torch.randperm(slots_n, generator=g)[:total].to(torch.int32)  # req_to_token row
    pos = policy.cache_position(torch.arange(total))
    k_buf = torch.randn(slots_n, HKV, D, generator=g).to(dtype)
    v_buf = torch.randn(slots_n, HKV, D, generator=g).to(dtype)
    k_buf[slots.long()] = rotate(torch.randn(total, HKV, D, generator=g), pos, rope).to(dtype)  # written at pos(k)
    gap = slots[s:max(s, first_t - w)].long()  # freed: never read
    k_buf[gap] = float("nan")
    v_buf[gap] = float("nan")
    q = rotate(torch.randn(n, HQ, D, generator=g), pos[first_t:], rope).to(dtype)
    learned = torch.randn(HQ, generator=g) if sinks else None
    got = chunk_attention(q, k_buf, v_buf, slots, first_t, 0.17, policy, rope, torch.empty_like(q),
                          sinks=learned, sliding_window=layer_window)
    want = paged_attention_ref(q.float(), k_buf.view(slots_n, 1, HKV, D).float(),
                               v_buf.view(slots_n, 1, HKV, D).float(), slots[None].long(),
                               torch.tensor([0, n]), torch.tensor([total]), 0.17, policy, rope, learned,
                               layer_window)
    return got, want


@pytest.mark.parametrize("s, w, first_t, n", [
    (4, 64, 0, 100),  # the first chunk, across the switch at 69
    (4, 64, 100, 100),  # past it
    (4, 64, 600, 3 * TILE + 5),  # several tiles, a ragged last one
    (4, 64, 60, 200),  # keys written in the dense regime, read by streaming queries
    (0, 32, 10, 200),  # no sinks
    (16, 8, 5, 40),  # more sinks than window
])
def test_matches_the_reference(s, w, first_t, n):
    got, want = _case(s, w, first_t, n)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("kw", [
    dict(neox=False, rotary_dim=16),  # GPT-J style, partial rotary
    dict(sinks=True),  # learned sinks (GPT-OSS)
    dict(sinks=True, layer_window=33),  # a sliding layer: its own window, no sink tokens past it
])
def test_model_variants_match_the_reference(kw):
    got, want = _case(4, 64, 50, 300, **kw)
    assert (got - want).abs().max().item() < 1e-5


def test_bf16_pool_matches_up_to_output_rounding():
    got, want = _case(4, 64, 200, 150, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() < 1e-2


def test_the_engine_tests_take_this_path():
    # tests/sglang's engines prefill in chunks of CHUNK queries: past the switch those go here.
    assert CHUNK >= PREFILL_MIN_QUERIES
