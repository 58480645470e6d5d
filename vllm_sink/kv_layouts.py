"""What differs between inner backends for the streaming rows: how to read the
layer's KV cache as ``[blocks, block_size, kv_heads, D]`` K and V views, and which
core kernel reads them (C++ on CPU, Triton on CUDA or under the Triton interpreter).

vLLM hands every backend one tensor per layer of logical shape
``[num_blocks, kv_heads, block_size, 2 * D]`` (K and V side by side in the last dim;
``vllm/v1/kv_cache_interface.py``). FLASH_ATTN, FLASHINFER and TRITON_ATTN read it as
``kv_cache.transpose(1, 2).split(D, -1)`` (their ``forward``); CPU_ATTN's vec ISAs
store, per block and head, the keys dim-major ``[D, block_size]`` then the values
token-major ``[block_size, D]``.

An fp8 ``--kv-cache-dtype`` keeps the same shapes and layouts in a ``torch.uint8``
tensor (one byte per element, ``x / scale`` per layer): each layout reads it through
the float8 view its inner backend reads, with the layer's ``_k_scale`` / ``_v_scale``
(docs/fp8-kv-cache.md).
"""

from __future__ import annotations

import logging

import torch

from streaming_sink.policy import PolicyConfigError
from streaming_sink.reference_attention import FP8_DTYPES

logger = logging.getLogger("vllm.streaming_sink")

# CPU_ATTN ISAs whose cache layout the core's CPU kernel reads.
_READABLE_ISAS = ("vec", "vec16")

# --kv-cache-dtype values the policy serves: a plain float cache is what it says
# (auto: the model's dtype); per-tensor fp8 is read with the layer's k/v scales.
# Every other vLLM cache dtype (per-token-head, nvfp4, turboquant, fp8_inc, MLA's)
# keeps scales or packing per slot that the core's kernels do not read.
PLAIN_KV_DTYPES = ("auto", "bfloat16", "float16")
FP8_KV_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")
SERVED_KV_DTYPES = PLAIN_KV_DTYPES + FP8_KV_DTYPES


def check_kv_cache_dtype(value: str | None, model_dtype: torch.dtype | None = None) -> None:
    """Startup check of ``--kv-cache-dtype`` with the policy on (one line, naming the flag).
    Given the model's dtype (once vLLM resolved it), a plain float cache must be that dtype:
    stock vLLM's CPU path already mis-serves a bfloat16 cache under a float32 model (its
    first greedy token differs from ``auto``), and no test checks the pair on a GPU."""
    if value is not None and value not in SERVED_KV_DTYPES:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink does not support --kv-cache-dtype {value}; it serves "
            f"{', '.join(SERVED_KV_DTYPES)}")
    if model_dtype is not None and value in PLAIN_KV_DTYPES[1:] and getattr(torch, value) != model_dtype:
        model = str(model_dtype).removeprefix("torch.")
        raise PolicyConfigError(
            f"--kv-policy streaming-sink does not support --kv-cache-dtype {value} under a {model} "
            f"model (a plain cache in another float type than the model's); use auto or fp8")


def fp8_by_name(kv_cache_dtype: str) -> torch.dtype:
    """The float8 dtype a cache dtype name says (CPU_ATTN and FLASHINFER read it so)."""
    return torch.float8_e5m2 if kv_cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn


def _fp8_scales(impl, layer, as_tensor: bool) -> dict:
    """The kernels' ``k_scale`` / ``v_scale``: the layer's own (1.0 unless a checkpoint or
    --calculate-kv-scales set them); none for a plain cache."""
    if impl.kv_dtype_name not in FP8_KV_DTYPES:
        return {}
    if as_tensor:  # on the device, read in the kernel: no host sync, capture-safe
        return dict(k_scale=layer._k_scale, v_scale=layer._v_scale)
    return dict(k_scale=layer._k_scale_float, v_scale=layer._v_scale_float)


class PagedLayout:
    """FLASH_ATTN, FLASHINFER, TRITON_ATTN: the core's Triton kernel."""

    def __init__(self, fp8_view_by_name: bool = False) -> None:
        # TRITON_ATTN and FLASH_ATTN read every fp8 cache as the platform's fp8 type
        # (CUDA: e4m3fn, also for fp8_e5m2, which they write as that too); FLASHINFER
        # by the name (fp8_e5m2 -> e5m2). Read it as the inner backend writes it.
        self.fp8_view_by_name = fp8_view_by_name

    def fp8_dtype(self, kv_cache_dtype: str) -> torch.dtype:
        if self.fp8_view_by_name:
            return fp8_by_name(kv_cache_dtype)
        from vllm.platforms import current_platform

        return current_platform.fp8_dtype()

    def prepare_builder(self, builder, layer_names) -> None:
        from streaming_sink import triton_attention

        if not triton_attention.is_available():
            raise PolicyConfigError(
                "--kv-policy streaming-sink needs Triton with a CUDA GPU for its streaming "
                "rows on this backend (or TRITON_INTERPRET=1 for tests)")

    @staticmethod
    def views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return kv_cache.transpose(1, 2).split(head_size, dim=-1)

    def attend(self, impl, q, kv_cache, rows, out, layer=None) -> None:
        from streaming_sink.triton_attention import paged_attention

        k_cache, v_cache = self.views(kv_cache, impl.head_size)
        scales = _fp8_scales(impl, layer, as_tensor=True)
        if scales:
            dtype = self.fp8_dtype(impl.kv_dtype_name)
            k_cache, v_cache = k_cache.view(dtype), v_cache.view(dtype)
        # vLLM quantizes the query for inner kernels that take one (TRITON_ATTN, FA3 with an
        # fp8 cache on CUDA): the core's kernel reads it as is, with the layer's q scale
        # (in-kernel: no allocation or extra launch in a captured step)
        q_scale = layer._q_scale if q.dtype in FP8_DTYPES else None
        paged_attention(
            q, k_cache, v_cache, rows.block_table, rows.query_start_loc, rows.seq_lens, impl.scale,
            impl.policy, impl.rope, _fp32_sinks(impl, q.device), impl.layer_window, out,
            max_query_len=rows.max_query_len, seq_mask=rows.seq_mask,
            workspace=_workspace(impl, q), sink_tokens=rows.sink_tokens,
            max_sink_tokens=rows.max_sink_tokens, q_scale=q_scale, **scales)


class CpuAttnLayout:
    """CPU_ATTN: the core's compiled CPU kernel, reading the vec ISAs' layout in place."""

    def prepare_builder(self, builder, layer_names) -> None:
        from vllm.platforms import CpuArchEnum, current_platform

        from streaming_sink.cpu_attention import load

        if builder.isa not in _READABLE_ISAS:
            if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
                raise PolicyConfigError(
                    f"--kv-policy streaming-sink: vLLM's CPU attention uses the {builder.isa!r} "
                    f"kernel here, whose KV layout the streaming kernel cannot read (x86 CPUs only)")
            logger.info("streaming-sink: CPU attention ISA %r -> 'vec' (the layout the streaming "
                        "kernel reads)", builder.isa)
            builder.isa = "vec"
            builder._set_isa_to_layers(layer_names)
        load()  # built once per machine, at startup rather than on the first request

    @staticmethod
    def views(kv_cache: torch.Tensor, head_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[blocks, block_size, kv_heads, D]`` views of CPU_ATTN's vec-ISA cache."""
        nb, hkv, bs, d2 = kv_cache.shape
        d = d2 // 2
        s_b, s_h = kv_cache.stride(0), kv_cache.stride(1)
        if kv_cache.stride(2) != d2 or kv_cache.stride(3) != 1:
            raise RuntimeError("streaming-sink: unexpected CPU KV cache strides")
        base = kv_cache.storage_offset()
        k = kv_cache.as_strided((nb, bs, hkv, d), (s_b, 1, s_h, bs), base)
        v = kv_cache.as_strided((nb, bs, hkv, d), (s_b, d, s_h, 1), base + bs * d)
        return k, v

    def attend(self, impl, q, kv_cache, rows, out, layer=None) -> None:
        from streaming_sink.cpu_attention import paged_attention_cpu

        k_cache, v_cache = self.views(kv_cache)
        scales = _fp8_scales(impl, layer, as_tensor=False)  # CPU_ATTN passes the floats too
        if scales:  # same vec layout, one byte per element: keys dim-major, values token-major
            dtype = fp8_by_name(impl.kv_dtype_name)
            k_cache, v_cache = k_cache.view(dtype), v_cache.view(dtype)
        paged_attention_cpu(
            q, k_cache, v_cache, rows.block_table, rows.query_start_loc, rows.seq_lens, impl.scale,
            policy=impl.policy, rope=impl.rope, sinks=impl.sink_logits, sliding_window=impl.layer_window,
            out=out, seq_ids=rows.seq_ids, sink_tokens=rows.sink_tokens,
            max_sink_tokens=rows.max_sink_tokens, **scales)


def for_backend(inner: type) -> PagedLayout | CpuAttnLayout:
    """The layout of an inner backend class (CPU_ATTN's own; every other one paged)."""
    name = inner.get_name()
    return CpuAttnLayout() if name == "CPU_ATTN" else PagedLayout(fp8_view_by_name=name == "FLASHINFER")


def _fp32_sinks(impl, device: torch.device) -> torch.Tensor | None:
    """The layer's learned sink logits as fp32 on ``device``, converted once (not per step)."""
    if impl.sink_logits is None:
        return None
    cached = getattr(impl, "_sinks_fp32", None)
    if cached is None or cached.device != device:
        cached = impl._sinks_fp32 = impl.sink_logits.detach().to(device=device, dtype=torch.float32).contiguous()
    return cached


_workspaces: dict = {}


def _workspace(impl, q: torch.Tensor) -> torch.Tensor | None:
    """One split-KV scratch buffer per (device, shape class), shared by all layers
    (they run one after another), allocated on the first call: before any capture."""
    from streaming_sink.triton_attention import workspace_elems

    n = workspace_elems(impl.num_heads, impl.num_kv_heads, impl.head_size, q.device)
    if n == 0:
        return None
    key = (q.device, n)
    if key not in _workspaces:
        _workspaces[key] = torch.empty(n, dtype=torch.float32, device=q.device)
    return _workspaces[key]
