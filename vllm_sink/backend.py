"""The attention backend vLLM runs while ``--kv-policy streaming-sink`` is on (CUDA),
and what it shares with the CPU one (backend_cpu.py).

It writes K/V into the paged cache like any backend and computes the contract
of docs/architecture.md with the engine-free core's Triton kernels. Live blocks
come from the policy, never from the block table's gap (it holds stale ids of
recycled blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec

from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.reference_attention import paged_attention_ref
from streaming_sink.rope import RotaryParams

from .config import policy_of
from .kv_manager import StreamingSinkSpec


def _current_policy() -> SinkPolicy:
    policy = policy_of(get_current_vllm_config())
    if policy is None:
        raise RuntimeError("the streaming-sink backend was selected without the policy in the config")
    return policy


class SinkBackendMixin:
    """What both streaming-sink backends (CPU: backend_cpu.py, CUDA: below) say to vLLM."""

    # vLLM asks customize_spec() for the layer specs outside any config
    # context; the model-load hook (hooks.py) sets the engine's policy here.
    policy: ClassVar[SinkPolicy | None] = None

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Full-attention layers become sink+window layers; a layer's own
        sliding window (e.g. GPT-OSS) stays a plain sliding-window layer."""
        if not isinstance(spec, FullAttentionSpec | SlidingWindowSpec):
            return spec
        policy = SinkBackendMixin.policy
        if policy is None:
            raise RuntimeError("streaming-sink: KV spec requested before the model was loaded")
        if isinstance(spec, SlidingWindowSpec):
            # The layer's own window (GPT-OSS): vLLM's SlidingWindowManager keeps
            # and frees its blocks; the policy only moves its positions. vLLM asks
            # with a placeholder block size here and picks the group's block size
            # later (the largest kernel block within the primary page: --block-size
            # when all layers have the same shape); the metadata builder checks it.
            return spec
        _check_block_size(spec.block_size, policy)
        return StreamingSinkSpec(
            block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
            head_size_v=spec.head_size_v, dtype=spec.dtype, kv_quant_mode=spec.kv_quant_mode,
            sliding_window=policy.window_tokens, sink_tokens=policy.sink_tokens)


class SinkImplMixin:
    """The per-layer state both streaming-sink impls keep: policy, rotary frequencies."""

    def _init_policy(self, alibi_slopes, sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                     kv_sharing_target_layer_name) -> None:
        unsupported = [name for name, bad in (
            ("ALiBi", alibi_slopes is not None),
            ("logits soft-capping", logits_soft_cap not in (None, 0)),
            (f"quantized KV cache ({kv_cache_dtype})", kv_cache_dtype != "auto"),
            ("cross-layer KV sharing", kv_sharing_target_layer_name is not None),
            (f"{attn_type} attention", attn_type != AttentionType.DECODER),
        ) if bad]
        if unsupported:
            raise PolicyConfigError(
                f"--kv-policy streaming-sink does not support {', '.join(unsupported)} yet")
        self.policy = _current_policy()
        self.policy.check_layer_window(sliding_window, "an attention layer")
        # Filled by rope_remap.install() once the model is built: the layer's
        # rotary frequencies, needed for the per-block query rotation.
        self.rope: RotaryParams | None = None

    def _check_rope(self) -> None:
        if self.rope is None:
            raise RuntimeError("streaming-sink: rotary parameters were not installed for this layer")


class StreamingSinkAttentionBackend(SinkBackendMixin, AttentionBackend):
    """CUDA: the core's Triton kernels over vLLM's paged cache."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_impl_cls() -> type["StreamingSinkAttentionImpl"]:
        return StreamingSinkAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["StreamingSinkMetadataBuilder"]:
        return StreamingSinkMetadataBuilder


def _check_block_size(block_size: int, policy: SinkPolicy) -> None:
    if block_size != policy.block_size:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink: a KV cache group uses block size {block_size}, "
            f"the policy {policy.block_size} (--block-size); every attention layer must "
            f"use the policy's block size")


@dataclass
class StreamingSinkMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class StreamingSinkMetadataBuilder(AttentionMetadataBuilder[StreamingSinkMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Both KV groups of a hybrid model (sliding layers, sink+window layers)
        # hold keys written at pos(t), read with per-block query rotations in the
        # policy's blocks: every group must use the policy's block size.
        policy = policy_of(vllm_config)
        if policy is not None:
            _check_block_size(kv_cache_spec.block_size, policy)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> StreamingSinkMetadata:
        m = common_attn_metadata
        return StreamingSinkMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
            query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
            block_table=m.block_table_tensor, slot_mapping=m.slot_mapping)


class StreamingSinkAttentionImpl(SinkImplMixin, AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        self._init_policy(alibi_slopes, sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                          kv_sharing_target_layer_name)
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.sliding_window = sliding_window
        self.sinks = sinks

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        # kv_cache is vLLM's logical per-layer view [blocks, kv_heads, block_size, 2 * D].
        n = slot_mapping.shape[0]
        keep = slot_mapping >= 0  # padded tokens carry slot -1
        slots = slot_mapping[keep].long()
        bs = kv_cache.shape[2]
        blk, off = slots // bs, slots % bs
        d = self.head_size
        kv_cache[blk, :, off, :d] = key[:n][keep].to(kv_cache.dtype)
        kv_cache[blk, :, off, d:] = value[:n][keep].to(kv_cache.dtype)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: StreamingSinkMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by streaming-sink")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        self._check_rope()
        n = attn_metadata.num_actual_tokens
        d = self.head_size
        k_cache = kv_cache[..., :d].transpose(1, 2)  # [blocks, block_size, kv_heads, D]
        v_cache = kv_cache[..., d:].transpose(1, 2)
        out = output[:n].view(n, self.num_heads, d)
        args = (query[:n].view(n, self.num_heads, d), k_cache, v_cache, attn_metadata.block_table,
                attn_metadata.query_start_loc, attn_metadata.seq_lens, self.scale)
        kwargs = dict(policy=self.policy, rope=self.rope, sinks=self.sinks,
                      sliding_window=self.sliding_window, out=out)
        if query.is_cuda:  # the GPU kernel slot: Triton kernels of the core
            from streaming_sink.triton_attention import paged_attention

            paged_attention(*args, **kwargs, max_query_len=attn_metadata.max_query_len)
        else:  # a non-CPU, non-CUDA device: the readable reference
            paged_attention_ref(*args, **kwargs)
        return output
