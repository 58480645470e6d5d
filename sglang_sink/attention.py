"""The contract over SGLang's token pool, computed by the engine-free core.

SGLang's KV pool is one slot per token (``[slots, Hkv, D]`` per layer) plus a
per-request row of slot ids. With page size 1 that is the core's paged layout
with ``block_size = 1`` and the rows as block table, so the core's reference
(CPU) or Triton kernels (CUDA) run on it unchanged: no attention math here.
"""

from __future__ import annotations

import torch

from streaming_sink.policy import SinkPolicy
from streaming_sink.reference_attention import paged_attention_ref
from streaming_sink.rope import RotaryParams


def token_pool_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         rows: torch.Tensor, seq_lens: torch.Tensor, q_lens: torch.Tensor,
                         scale: float, policy: SinkPolicy, rope: RotaryParams, out: torch.Tensor,
                         sinks: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """``q``/``out`` [tokens, Hq, D] (requests back to back, ``q_lens`` each, the last
    ``q_lens[i]`` positions of ``seq_lens[i]``); ``k_buffer``/``v_buffer`` [slots, Hkv, D];
    ``rows`` [requests, >= max(seq_lens)] slot ids by token position."""
    bs = policy.block_size
    k_cache = k_buffer.view(-1, bs, *k_buffer.shape[1:])  # slot s = block s // bs, offset s % bs
    v_cache = v_buffer.view(-1, bs, *v_buffer.shape[1:])
    table = rows[:, ::bs] // bs  # a page's first slot names the page
    query_start_loc = torch.zeros(q_lens.shape[0] + 1, dtype=torch.int64, device=q.device)
    torch.cumsum(q_lens.to(torch.int64), 0, out=query_start_loc[1:])
    args = (q, k_cache, v_cache, table, query_start_loc, seq_lens, scale)
    kwargs = dict(policy=policy, rope=rope, sinks=sinks, sliding_window=sliding_window, out=out)
    if q.is_cuda:  # the GPU slot: the core's Triton kernels, same API
        from streaming_sink.triton_attention import paged_attention

        return paged_attention(*args, **kwargs, max_query_len=int(q_lens.max()))
    return paged_attention_ref(*args, **kwargs)
