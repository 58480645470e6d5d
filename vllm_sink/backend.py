"""The attention backend vLLM runs while ``--kv-policy streaming-sink`` is on: one
wrapper around the backend vLLM would pick without the policy (the *inner* backend:
CPU_ATTN on CPU; FLASH_ATTN, FLASHINFER or TRITON_ATTN on CUDA, by vLLM's own
selection or the user's ``--attention-backend``).

The wrapped class *is* the inner backend (a subclass: same KV layout, same cache
write, same builder and impl), with one change: each step's sequences are split by
regime (``streaming_sink.step_split``).

* Dense sequences (every query below the window) are what stock vLLM computes: the
  inner impl runs them, with metadata the inner builder builds for that subset.
  A step with no streaming sequence is exactly one stock call: bit-identical to stock.
* Streaming sequences run the core's kernel (kv_layouts.py picks it: C++ on CPU,
  Triton on CUDA), which reads only their live blocks, never the block table's gap.

The same three mixins serve every inner backend, so CPU tests run the dispatch code
a GPU runs. The streaming call itself is capture-safe: the builder prepares
everything on the host into persistent buffers; ``forward`` only launches kernels
(no device->host copy, no allocation, shapes fixed by the batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec

from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.rope import RotaryParams
from streaming_sink.step_split import StepSplit, split_step

from . import kv_layouts
from .config import policy_of
from .kv_manager import StreamingSinkSpec
from .request_sinks import WorkerSinks

# ---- which classes exist: one wrapper per inner backend ------------------------

_WRAPPED: dict[str, type] = {}
_PREFIX = "StreamingSink_"


def wrap(inner: type) -> type:
    """The streaming-sink backend around ``inner`` (one class per inner backend)."""
    name = _PREFIX + inner.get_name()
    if name not in _WRAPPED:
        layout = {"layout": kv_layouts.for_backend(inner)}  # one per inner backend, shared
        builder = type(name + "Builder", (SinkMetadataBuilder, inner.get_builder_cls()), layout)
        impl = type(name + "Impl", (SinkImpl, inner.get_impl_cls()), layout)
        _WRAPPED[name] = type(name, (SinkBackend, inner), {
            "__module__": __name__, "inner": inner, "builder_cls": builder, "impl_cls": impl,
            # the cache dtypes the policy serves (kv_layouts.py) that the inner backend has
            "supported_kv_cache_dtypes": [d for d in inner.supported_kv_cache_dtypes
                                          if d in kv_layouts.SERVED_KV_DTYPES]})
        builder.__module__ = impl.__module__ = __name__
    return _WRAPPED[name]


def class_path(inner: type) -> str:
    """The qualified name vLLM resolves (``resolve_obj_by_qualname``) for ``wrap(inner)``."""
    return f"{__name__}.{wrap(inner).__name__}"


def __getattr__(name: str) -> Any:
    """PEP 562: ``vllm_sink.backend.StreamingSink_<INNER>`` resolves in any process,
    also one where the platform hook did not run (the name says the inner backend)."""
    if name.startswith(_PREFIX):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        inner = name[len(_PREFIX):]
        if inner in AttentionBackendEnum.__members__:
            return wrap(AttentionBackendEnum[inner].get_class())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _current_policy() -> SinkPolicy:
    policy = policy_of(get_current_vllm_config())
    if policy is None:
        raise RuntimeError("the streaming-sink backend was selected without the policy in the config")
    return policy


def check_block_size(block_size: int, policy: SinkPolicy) -> None:
    if block_size != policy.block_size:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink: a KV cache group uses block size {block_size}, "
            f"the policy {policy.block_size} (--block-size); every attention layer must "
            f"use the policy's block size")


# ---- the backend class ------------------------------------------------------------

class SinkBackend:
    """What the wrapped backend says to vLLM; everything else is the inner backend's."""

    inner: ClassVar[type]
    builder_cls: ClassVar[type]
    impl_cls: ClassVar[type]
    # vLLM asks customize_spec() for the layer specs outside any config context;
    # the model-load hook (hooks/model_load.py) sets the engine's policy here.
    policy: ClassVar[SinkPolicy | None] = None
    max_sink_tokens: ClassVar[int | None] = None  # --max-sink-tokens (set with policy)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def get_impl_cls(cls) -> type:
        return cls.impl_cls

    @classmethod
    def get_builder_cls(cls) -> type:
        return cls.builder_cls

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
        policy = SinkBackend.policy
        if policy is None:
            raise RuntimeError("streaming-sink: KV spec requested before the model was loaded")
        if isinstance(spec, SlidingWindowSpec):
            # The layer's own window (GPT-OSS): vLLM's SlidingWindowManager keeps
            # and frees its blocks; the policy only moves its positions. vLLM asks
            # with a placeholder block size here and picks the group's block size
            # later; the metadata builder checks it.
            return spec
        check_block_size(spec.block_size, policy)
        return StreamingSinkSpec(
            block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
            head_size_v=spec.head_size_v, dtype=spec.dtype, kv_quant_mode=spec.kv_quant_mode,
            sliding_window=policy.window_tokens, sink_tokens=policy.sink_tokens,
            max_sink_tokens=max(policy.sink_tokens, SinkBackend.max_sink_tokens or 0))


# ---- metadata: the step split by regime --------------------------------------------

@dataclass
class StreamingRows:
    """What the core's kernel needs for the streaming sequences of a step. Every
    tensor is a view of a persistent buffer of the builder (same storage each step)."""

    query_start_loc: torch.Tensor  # whole batch (the kernel skips dense sequences)
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    seq_mask: torch.Tensor  # int32 per sequence: 1 = ours this step
    seq_ids: torch.Tensor  # the same as indices (the CPU kernel's form)
    max_query_len: int
    # each sequence's own S (per-request sinks), None when every row has the server's
    sink_tokens: torch.Tensor | None = None
    max_sink_tokens: int | None = None  # host-side bound of sink_tokens


@dataclass
class SinkMetadata:
    num_actual_tokens: int
    inner: Any  # the inner builder's metadata for the dense sequences (None: none)
    dense_rows: torch.Tensor | None  # their query rows, when not every sequence is dense
    streaming: StreamingRows | None  # None: every sequence dense, exactly stock


class SinkMetadataBuilder:
    """Mixed in front of the inner builder: splits each step, builds the inner
    metadata for the dense subset, fills persistent buffers for the streaming rows."""

    layout: ClassVar[kv_layouts.PagedLayout | kv_layouts.CpuAttnLayout]  # set by wrap()

    # The metadata is ours (SinkMetadata), not the inner builder's: vLLM must neither
    # patch another KV group's block table into a copy of it (FLASH_ATTN's
    # update_block_table) nor capture the inner kernel alone in a full CUDA graph
    # (its capture batch is all dense; a replay would run it on streaming rows too).
    # NEVER makes vLLM fall back to piecewise graphs around attention by itself.
    supports_update_block_table: bool = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        from vllm.v1.attention.backend import AttentionCGSupport

        return AttentionCGSupport.NEVER

    @classmethod
    def get_varlen_cudagraph_max_query_len(cls, vllm_config, kv_cache_spec):
        return None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.policy: SinkPolicy = policy_of(vllm_config)
        self._vllm_config = vllm_config  # finds the runner's per-row S (request_sinks.WorkerSinks)
        # Every KV group (a hybrid's sliding layers too) holds keys written at
        # pos(t), read with per-block query rotations in the policy's blocks.
        check_block_size(kv_cache_spec.block_size, self.policy)
        self.layout.prepare_builder(self, layer_names)
        # a step never has more sequences than either bound (padded batches included)
        sched = vllm_config.scheduler_config
        n = max(sched.max_num_seqs, sched.max_num_batched_tokens)
        self._mask = torch.zeros(n, dtype=torch.int32, device=device)
        self._ids = torch.zeros(n, dtype=torch.int64, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SinkMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        lens = _host_seq_lens(m)
        state = WorkerSinks.of(self._vllm_config)
        per_row = None if state is None else state.rows_for(n)  # None: every row has the default S
        lowest = self.policy.sink_tokens if per_row is None else per_row[2]
        if lens is not None:
            split = split_step(self.policy, lens[:n], m.query_start_loc_cpu, m.max_seq_len,
                               sink_tokens=None if per_row is None else per_row[0], min_sink_tokens=lowest)
        elif m.max_seq_len <= self.policy.dense_tokens_of(lowest):
            split = StepSplit(None, None, None, None, all_dense=True)
        else:  # no exact host lengths (async speculative decoding on a GPU): the core's
            # kernel takes every sequence; it computes the dense regime exactly too
            split = StepSplit(None, None, None, torch.arange(n), all_dense=False)
        if split.all_dense:  # exactly stock: the inner builder, nothing of ours
            return SinkMetadata(m.num_actual_tokens, super().build(common_prefix_len, m, fast_build),
                                None, None)
        inner = dense_rows = None
        if split.dense_ids is not None:
            inner, dense_rows = self._build_subset(common_prefix_len, m, split, lens, fast_build)
        ids = split.streaming_ids
        mask, seq_ids = self._mask[:n], self._ids[:len(ids)]
        ours = torch.zeros(n, dtype=torch.int32)
        ours[ids] = 1
        mask.copy_(ours, non_blocking=True)
        seq_ids.copy_(ids, non_blocking=True)
        streaming = StreamingRows(
            query_start_loc=m.query_start_loc, seq_lens=m.seq_lens[:n], block_table=m.block_table_tensor,
            seq_mask=mask, seq_ids=seq_ids, max_query_len=m.max_query_len,
            sink_tokens=None if per_row is None else per_row[1],
            max_sink_tokens=None if per_row is None else per_row[3])
        return SinkMetadata(m.num_actual_tokens, inner, dense_rows, streaming)

    def _build_subset(self, common_prefix_len, m, split, lens, fast_build):
        """The inner builder's metadata for the dense sequences alone (``lens``: the step's
        host lengths), and their query rows."""
        ids, rows, sub_qsl = split.dense_ids, split.dense_rows, split.dense_query_start_loc
        sub_qsl = sub_qsl.to(m.query_start_loc_cpu.dtype)
        dev = m.query_start_loc.device
        dev_ids, dev_rows = ids.to(dev, non_blocking=True), rows.to(dev, non_blocking=True)
        upper = m.seq_lens_cpu_upper_bound
        sub = dataclasses.replace(
            m, query_start_loc=sub_qsl.to(dev, non_blocking=True), query_start_loc_cpu=sub_qsl,
            seq_lens=m.seq_lens[dev_ids], num_reqs=len(ids), num_actual_tokens=len(rows),
            max_query_len=int(sub_qsl.diff().max()), max_seq_len=int(lens[ids].max()),
            block_table_tensor=m.block_table_tensor[dev_ids], slot_mapping=m.slot_mapping[dev_rows],
            positions=None, is_prefilling=_take(m.is_prefilling, ids),
            seq_lens_cpu_upper_bound=None if upper is None else upper[ids],
            req_idx=None if m.req_idx is None else m.req_idx[ids.numpy()],
            rswa_prefix_lens=_take(m.rswa_prefix_lens, ids),
            mm_req_doc_ranges=None if m.mm_req_doc_ranges is None else {
                new: m.mm_req_doc_ranges[int(old)] for new, old in enumerate(ids)
                if int(old) in m.mm_req_doc_ranges},
            logits_indices_padded=None, num_logits_indices=None,
            _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
        return super().build(common_prefix_len, sub, fast_build), dev_rows


def _take(t: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """``t[ids]`` with the index on ``t``'s own device (vLLM keeps some fields on the host)."""
    return None if t is None else t[ids.to(t.device)]


def _host_seq_lens(m: CommonAttentionMetadata) -> torch.Tensor | None:
    """Exact sequence lengths on the host, without a device sync (None: not known)."""
    if m.seq_lens.device.type == "cpu":
        return m.seq_lens
    if m.seq_lens_cpu_upper_bound is not None and not _async_speculation():
        return m.seq_lens_cpu_upper_bound  # exact outside async speculative decoding
    return None


def _async_speculation() -> bool:
    config = get_current_vllm_config()
    return config.speculative_config is not None and bool(config.scheduler_config.async_scheduling)


# ---- the impl ----------------------------------------------------------------------

class SinkImpl:
    """Mixed in front of the inner impl: dense rows through it, streaming rows
    through the core's kernel. The cache write is the inner impl's own (keys arrive
    rotated at pos(t) from the model's RoPE: rope_remap.py)."""

    layout: ClassVar[kv_layouts.PagedLayout | kv_layouts.CpuAttnLayout]  # set by wrap()

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **kwargs) -> None:
        unsupported = [name for name, bad in (
            ("ALiBi", alibi_slopes is not None),
            ("logits soft-capping", logits_soft_cap not in (None, 0)),
            (f"KV cache dtype {kv_cache_dtype}",
             kv_cache_dtype not in kv_layouts.SERVED_KV_DTYPES),
            ("cross-layer KV sharing", kv_sharing_target_layer_name is not None),
            (f"{attn_type} attention", attn_type != AttentionType.DECODER),
        ) if bad]
        if unsupported:
            raise PolicyConfigError(
                f"--kv-policy streaming-sink does not support {', '.join(unsupported)} yet")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
                         **kwargs)
        self.policy = _current_policy()
        self.policy.check_layer_window(sliding_window, "an attention layer")
        self.layer_window = sliding_window  # the contract's form (None: no window of its own)
        self.kv_dtype_name = kv_cache_dtype  # fp8: the layout reads the cache's float8 view, scaled
        self.sink_logits = sinks
        # Filled by rope_remap.install() once the model is built: the layer's
        # rotary frequencies, needed for the per-block query rotation.
        self.rope: RotaryParams | None = None

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False  # streaming rows write plain outputs: never fuse a quantization in

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        m = attn_metadata
        if not isinstance(m, SinkMetadata):  # profiling / warm-up run
            return super().forward(layer, query, key, value, kv_cache, m, output, output_scale,
                                   output_block_scale)
        if m.streaming is None:  # every sequence dense: exactly stock vLLM
            return super().forward(layer, query, key, value, kv_cache, m.inner, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by streaming-sink")
        if m.inner is not None:  # dense sequences of a mixed step (eager only: shapes vary)
            rows = m.dense_rows
            part = output.new_empty((len(rows), *output.shape[1:]))
            super().forward(layer, query[rows], key, value, kv_cache, m.inner, part)
            output.index_copy_(0, rows, part)
        if self.rope is None:
            raise RuntimeError("streaming-sink: rotary parameters were not installed for this layer")
        n, d = m.num_actual_tokens, self.head_size
        self.layout.attend(
            self, query[:n].view(n, self.num_heads, d), kv_cache, m.streaming,
            output[:n].view(n, self.num_heads, d), layer=layer)
        return output
