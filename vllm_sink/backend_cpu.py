"""The attention backend vLLM runs on CPU while ``--kv-policy streaming-sink`` is on.

It *is* vLLM's CPU_ATTN backend (subclassed: same KV layout, same cache-write op,
same metadata), with one change: each step's sequences are split by regime.

* Dense rows (``seq_len <= dense_tokens``: every query below the window) are what
  stock vLLM computes, keys at their natural positions: they run vLLM's own
  ``cpu_attention_with_kv_cache`` op, so their outputs and speed are stock's.
* Streaming rows run the core's compiled kernel (``streaming_sink/cpu_attention.py``),
  which reads only their live blocks straight from the CPU_ATTN layout.

A step with no streaming row is one stock call; a mixed step makes one call of each.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from vllm.platforms import CpuArchEnum, current_platform
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from streaming_sink.cpu_attention import load as load_kernel
from streaming_sink.cpu_attention import paged_attention_cpu, query_rows
from streaming_sink.policy import PolicyConfigError, SinkPolicy

from .backend import SinkBackendMixin, SinkImplMixin, _check_block_size
from .config import policy_of

logger = logging.getLogger("vllm.streaming_sink")

# CPU_ATTN ISAs whose cache layout the core's kernel reads: per block and kv head,
# keys dim-major [D, block_size], then values token-major [block_size, D].
_READABLE_ISAS = ("vec", "vec16")


class StreamingSinkCPUBackend(SinkBackendMixin, CPUAttentionBackend):
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_impl_cls() -> type["StreamingSinkCPUImpl"]:
        return StreamingSinkCPUImpl

    @staticmethod
    def get_builder_cls() -> type["StreamingSinkCPUMetadataBuilder"]:
        return StreamingSinkCPUMetadataBuilder


@dataclass
class StreamingSinkCPUMetadata:
    num_actual_tokens: int
    stock: CPUAttentionMetadata | None  # the dense sequences' stock metadata (None: no dense row)
    dense_rows: torch.Tensor | None  # their query rows, when not all rows are dense
    streaming_seqs: torch.Tensor | None  # sequences for the core's kernel (None: none)
    query_start_loc: torch.Tensor  # int64, whole batch
    seq_lens: torch.Tensor
    block_table: torch.Tensor  # int32, as vLLM keeps it


class StreamingSinkCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.policy: SinkPolicy = policy_of(vllm_config)
        # Both KV groups of a hybrid model (sliding layers, sink+window layers)
        # hold keys written at pos(t), read with per-block query rotations in the
        # policy's blocks: every group must use the policy's block size.
        _check_block_size(kv_cache_spec.block_size, self.policy)
        if self.isa not in _READABLE_ISAS:
            if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
                raise PolicyConfigError(
                    f"--kv-policy streaming-sink: vLLM's CPU attention uses the {self.isa!r} kernel "
                    f"here, whose KV layout the streaming kernel cannot read (x86 CPUs only)")
            logger.info("streaming-sink: CPU attention ISA %r -> 'vec' (the layout the streaming "
                        "kernel reads)", self.isa)
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)
        load_kernel()  # built once per machine, at startup rather than on the first request

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> StreamingSinkCPUMetadata:
        m = common_attn_metadata
        seq_lens = m.seq_lens[:m.num_reqs]
        # max_seq_len (an upper bound) spares the per-row check in the common case.
        dense = None if m.max_seq_len <= self.policy.dense_tokens else seq_lens <= self.policy.dense_tokens
        if dense is None or bool(dense.all()):  # every row dense: exactly stock, nothing of ours
            return StreamingSinkCPUMetadata(
                num_actual_tokens=m.num_actual_tokens, stock=super().build(common_prefix_len, m, fast_build),
                dense_rows=None, streaming_seqs=None, query_start_loc=m.query_start_loc, seq_lens=seq_lens,
                block_table=m.block_table_tensor)
        stock = dense_rows = None
        if bool(dense.any()):
            stock, dense_rows = self._build_subset(common_prefix_len, m, torch.nonzero(dense).flatten(), fast_build)
        return StreamingSinkCPUMetadata(
            num_actual_tokens=m.num_actual_tokens, stock=stock, dense_rows=dense_rows,
            streaming_seqs=torch.nonzero(~dense).flatten(), query_start_loc=m.query_start_loc.long(),
            seq_lens=seq_lens.long(), block_table=m.block_table_tensor)

    def _build_subset(self, common_prefix_len, m, ids, fast_build):
        """Stock metadata for the sequences ``ids`` alone, and their query rows."""
        rows, sub_qsl = query_rows(m.query_start_loc, ids)
        sub_qsl = sub_qsl.to(m.query_start_loc.dtype)
        seq_lens = m.seq_lens[ids]
        sub = dataclasses.replace(
            m, query_start_loc=sub_qsl, query_start_loc_cpu=sub_qsl, seq_lens=seq_lens,
            num_reqs=len(ids), num_actual_tokens=len(rows), max_query_len=int(sub_qsl.diff().max()),
            max_seq_len=int(seq_lens.max()), block_table_tensor=m.block_table_tensor[ids],
            slot_mapping=m.slot_mapping[rows], positions=None, is_prefilling=None,
            seq_lens_cpu_upper_bound=None, req_idx=None)
        return super().build(common_prefix_len, sub, fast_build), rows


class StreamingSinkCPUImpl(SinkImplMixin, CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        self._init_policy(alibi_slopes, sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                          kv_sharing_target_layer_name)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.layer_window = sliding_window  # the contract's form (None: no window of its own)

    # do_kv_cache_update: CPU_ATTN's own (keys are written at pos(t) by the model's RoPE).

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None or output_scale is not None or output_block_scale is not None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        m: StreamingSinkCPUMetadata = attn_metadata
        if m.streaming_seqs is None:  # every row dense: exactly stock vLLM
            return super().forward(layer, query, key, value, kv_cache, m.stock, output)
        if m.stock is not None:  # dense rows of a mixed step
            rows = m.dense_rows
            part = output.new_empty((len(rows), *output.shape[1:]))
            super().forward(layer, query[rows], key, value, kv_cache, m.stock, part)
            output[rows] = part
        self._check_rope()
        n, d = m.num_actual_tokens, self.head_size
        k_cache, v_cache = cpu_attn_cache_views(kv_cache)
        paged_attention_cpu(
            query[:n].view(n, self.num_heads, d), k_cache, v_cache, m.block_table, m.query_start_loc,
            m.seq_lens, self.scale, policy=self.policy, rope=self.rope, sinks=self.sinks,
            sliding_window=self.layer_window, out=output[:n].view(n, self.num_heads, d),
            seq_ids=m.streaming_seqs)
        return output


def cpu_attn_cache_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[blocks, block_size, kv_heads, D] views of CPU_ATTN's ``[blocks, kv_heads,
    block_size, 2 * D]`` cache for the vec ISAs: per (block, head) the first
    ``block_size * D`` elements are the keys dim-major, then the values token-major."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    s_b, s_h = kv_cache.stride(0), kv_cache.stride(1)
    if kv_cache.stride(2) != d2 or kv_cache.stride(3) != 1:
        raise RuntimeError("streaming-sink: unexpected CPU KV cache strides")
    base = kv_cache.storage_offset()
    k = kv_cache.as_strided((nb, bs, hkv, d), (s_b, 1, s_h, bs), base)
    v = kv_cache.as_strided((nb, bs, hkv, d), (s_b, d, s_h, 1), base + bs * d)
    return k, v
