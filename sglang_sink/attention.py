"""The contract over SGLang's token pool, computed by the engine-free core.

SGLang's KV pool is one slot per token (``[slots, Hkv, D]`` per layer) plus a
per-request row of slot ids (``req_to_token``). With page size 1 that is the
core's paged layout with ``block_size = 1`` and the rows as block table, so the
core's kernels run on it unchanged: the compiled CPU kernel reads the pool and
``req_to_token`` in place; on CUDA the Triton kernels take the gathered rows.
No attention math here.
"""

from __future__ import annotations

import torch

from streaming_sink.cpu_attention import paged_attention_cpu
from streaming_sink.policy import SinkPolicy
from streaming_sink.rope import RotaryParams


def query_start_loc(q_lens: torch.Tensor) -> torch.Tensor:
    """Varlen offsets ``[requests + 1]`` (int64) of requests with ``q_lens`` queries each."""
    qsl = torch.zeros(q_lens.shape[0] + 1, dtype=torch.int64, device=q_lens.device)
    torch.cumsum(q_lens.to(torch.int64), 0, out=qsl[1:])
    return qsl


def token_pool_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, qsl: torch.Tensor, scale: float,
                         policy: SinkPolicy, rope: RotaryParams, out: torch.Tensor,
                         sinks: torch.Tensor | None = None, sliding_window: int | None = None,
                         seq_ids: torch.Tensor | None = None, sink_tokens: torch.Tensor | None = None,
                         max_sink_tokens: int | None = None) -> torch.Tensor:
    """``q``/``out`` [tokens, Hq, D] (requests back to back at offsets ``qsl``, request ``i``'s
    queries the last positions of ``seq_lens[i]``); ``k_buffer``/``v_buffer`` [slots, Hkv, D];
    request ``i``'s slot ids by token position are ``req_to_token[req_pool_indices[i]]``.
    ``seq_ids``: compute only these requests' rows (CPU). ``sink_tokens``: request ``i``'s
    own ``S`` (None: ``policy.sink_tokens`` for all), at most ``max_sink_tokens``."""
    if policy.block_size != 1:
        raise ValueError(f"SGLang's token pool is paged by 1, the policy by {policy.block_size}")
    k_cache = k_buffer.view(-1, 1, *k_buffer.shape[1:])  # slot s = block s
    v_cache = v_buffer.view(-1, 1, *v_buffer.shape[1:])
    kwargs = dict(policy=policy, rope=rope, sinks=sinks, sliding_window=sliding_window, out=out)
    if sink_tokens is not None:
        kwargs.update(sink_tokens=sink_tokens, max_sink_tokens=max_sink_tokens)
    if q.is_cuda:  # the GPU slot: the core's Triton kernels, same API
        from streaming_sink.triton_attention import paged_attention

        if seq_ids is not None:
            raise ValueError("the Triton path computes whole batches")
        table = req_to_token[req_pool_indices.long()]
        return paged_attention(q, k_cache, v_cache, table, qsl, seq_lens, scale, **kwargs,
                               max_query_len=int(qsl.diff().max()))
    return paged_attention_cpu(q, k_cache, v_cache, req_to_token, qsl, seq_lens, scale,
                               **kwargs, seq_ids=seq_ids, table_rows=req_pool_indices)
