"""A pure-torch stand-in for the CUDA-only ``sgl_kernel`` package: test/CPU support.

The PyPI ``sglang-kernel`` wheel carries CUDA ops only, yet SGLang 0.5.23 with
``SGLANG_USE_CPU_ENGINE=1`` imports CPU ops from it at module level
(``mem_cache/allocation.py``, ``kernels/ops/kvcache/cache_move.py``, ...). Put this
folder's parent first on PYTHONPATH (tests/sglang/conftest.py does, for the server
and the Engine's subprocesses too). The one op a tiny Llama with ``torch_native``
attention reaches is ``assign_req_to_token_pool_cpu``; any other name imports fine
and raises if it is ever called, so a path we did not expect fails loudly.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+cpu-standin"


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len=None) -> None:
    """req_to_token[req, start:end] = the next (end - start) slots of out_cache_loc, per request."""
    starts, ends = start_offset.tolist(), end_offset.tolist()
    offset = 0
    for row, s, e in zip(req_pool_indices.tolist(), starts, ends):
        n = e - s
        req_to_token[row, s:e] = out_cache_loc[offset:offset + n].to(req_to_token.dtype)
        offset += n


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: not in the CPU stand-in (tests/sglang/cpu_support)")

    missing.__name__ = name
    return missing
