"""The contract on CPU as a compiled kernel: ``csrc/sink_attention_cpu.cpp``.

Same arguments and results as :func:`streaming_sink.reference_attention.paged_attention_ref`
(the readable ground truth it is tested against), plus two engine conveniences:
``seq_ids`` computes only those sequences' rows and leaves the others' rows of
``out`` as they are (an adapter runs its engine's own kernel on them), and
``table_rows`` names the row of ``block_table`` each sequence reads (SGLang's
``req_to_token`` pool, int32, used in place). Tables may be int32 or int64. Built on first use with
``torch.utils.cpp_extension`` (g++, ~1 minute once; cached per torch version in
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).

``STREAMING_SINK_CPU_KERNEL=reference`` runs the torch reference instead (for
comparisons; it is several times slower); so does a machine where the kernel cannot
be built (one warning says why).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .policy import SinkPolicy
from .reference_attention import FP8_DTYPES, cache_scale, check_args
from .rope import RotaryParams

KERNEL_ENV = "STREAMING_SINK_CPU_KERNEL"
logger = logging.getLogger("streaming_sink")


def use_reference() -> bool:
    choice = os.environ.get(KERNEL_ENV, "compiled")
    if choice not in ("compiled", "reference"):
        raise ValueError(f"{KERNEL_ENV} must be 'compiled' or 'reference', got {choice!r}")
    return choice == "reference"


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Builds (once per machine and torch version) and loads the kernel. False, with one
    warning, if it cannot be built here (no compiler, no writable cache): the torch
    reference then computes the same numbers, several times slower."""
    if use_reference():
        return False
    from torch.utils.cpp_extension import load as build

    src = Path(__file__).with_name("csrc") / "sink_attention_cpu.cpp"
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    try:
        build(name=f"streaming_sink_cpu_{tag}", sources=[str(src)], is_python_module=False,
              extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
              extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 (a build failure has many types; all mean the same here)
        logger.warning("streaming-sink: the CPU attention kernel could not be built (%s: %s); using the "
                       "torch reference instead (same results, several times slower). A C++ compiler "
                       "(g++) and a writable $TORCH_EXTENSIONS_DIR are needed.", type(e).__name__, e)
        return False
    return True


_tables: dict[tuple, tuple[RotaryParams, torch.Tensor]] = {}


def rotation_table(policy: SinkPolicy, rope: RotaryParams) -> torch.Tensor:
    """cos/sin of ``delta = m * block_size`` for ``m = 0 .. Wb``: ``[Wb + 1, rotary_dim/2, 2]``.

    Every streaming query's window blocks are rotated by one of these (the blocks
    written in the dense regime by one more delta, computed in the kernel). Angles in
    float64 like :func:`streaming_sink.rope.rotate`. One table per layer rotary and policy.
    """
    key = (id(rope), policy)
    hit = _tables.get(key)
    if hit is None or hit[0] is not rope:
        delta = torch.arange(policy.window_blocks + 1, dtype=torch.float64) * policy.block_size
        ang = delta[:, None] * rope.inv_freq.to(torch.float64)[None, :]
        table = torch.stack([ang.cos(), ang.sin()], dim=-1).float().contiguous()
        hit = _tables[key] = (rope, table)
    return hit[1]


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    policy: SinkPolicy | None = None,
    rope: RotaryParams | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    table_rows: torch.Tensor | None = None,
    *,
    sink_tokens: torch.Tensor | None = None,
    max_sink_tokens: int | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The contract for every query row of ``q`` (of ``seq_ids``' rows only, if given).
    ``sink_tokens`` is indexed by sequence like ``seq_lens`` (also with ``seq_ids``)."""
    check_args(k_cache, policy, rope, sink_tokens, max_sink_tokens)
    if out is None:
        out = torch.empty_like(q)
    if use_reference() or not load():
        return _reference(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, policy, rope,
                          sinks, sliding_window, out, seq_ids, table_rows,
                          dict(sink_tokens=sink_tokens, max_sink_tokens=max_sink_tokens, k_scale=k_scale,
                               v_scale=v_scale))
    seq_sinks = None
    if sink_tokens is not None:
        seq_sinks = sink_tokens.long().contiguous()
        bound = policy.sink_tokens if max_sink_tokens is None else max_sink_tokens
        if seq_sinks.numel() and int(seq_sinks.max()) > bound:  # a CPU tensor: reading it costs no sync
            raise ValueError(f"sink_tokens {seq_sinks.tolist()} above max_sink_tokens={bound}")
    ks, vs = cache_scale(k_cache, k_scale), cache_scale(v_cache, v_scale)  # host floats (CPU tensors)
    # The kernel reads q/out in float32 or the cache's dtype (an fp8 cache: bf16/fp16);
    # anything else goes via float32.
    native = (torch.bfloat16, torch.float16) if k_cache.dtype in FP8_DTYPES else (k_cache.dtype,)
    direct = q.dtype in (torch.float32, *native) and out.dtype == q.dtype and out.is_contiguous()
    qk = q.contiguous() if direct else q.float().contiguous()
    ok = out if direct else torch.empty_like(qk)
    if not direct and seq_ids is not None:
        ok.copy_(out)
    table = inv = None
    if policy is not None:
        table = rotation_table(policy, rope)
        inv = rope.inv_freq.float().contiguous()
    torch.ops.streaming_sink.paged_attention(
        ok, qk, k_cache, v_cache, _int_table(block_table), None if table_rows is None else table_rows.long(),
        query_start_loc.long(), seq_lens.long(),
        float(scale), policy.sink_tokens if policy else 0, policy.window_blocks if policy else -1,
        table, inv, rope.rotary_dim if policy else 0, bool(rope.is_neox_style) if policy else True,
        None if sinks is None else sinks.float().contiguous(), int(sliding_window or 0),
        None if seq_ids is None else seq_ids.long(), seq_sinks, ks, vs)
    if not direct:
        out.copy_(ok)
    return out


def _reference(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, policy, rope, sinks,
               sliding_window, out, seq_ids, table_rows, extra=None):
    from .reference_attention import paged_attention_ref  # noqa: PLC0415 (only on the fallback)
    from .step_split import query_rows  # noqa: PLC0415

    if table_rows is not None:
        block_table = block_table[table_rows.long()]
    extra = dict(extra or {})
    if seq_ids is None:
        return paged_attention_ref(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                                   policy, rope, sinks, sliding_window, out, **extra)
    # Only these sequences' rows change; the reference computes whole batches.
    rows, sub_qsl = query_rows(query_start_loc, seq_ids)
    if extra.get("sink_tokens") is not None:
        extra["sink_tokens"] = extra["sink_tokens"][seq_ids.long()]
    part = paged_attention_ref(q[rows], k_cache, v_cache, block_table[seq_ids.long()], sub_qsl,
                               seq_lens[seq_ids.long()], scale, policy, rope, sinks, sliding_window, **extra)
    out[rows] = part.to(out.dtype)
    return out


def _int_table(table: torch.Tensor) -> torch.Tensor:
    if table.dtype not in (torch.int32, torch.int64):
        table = table.long()
    return table if table.stride(-1) == 1 else table.contiguous()
