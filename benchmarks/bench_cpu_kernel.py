"""The CPU attention kernels alone, per call: the core's compiled kernel (streaming rows),
the torch reference it is tested against, and vLLM's own CPU_ATTN op (what dense rows run)
at the same live KV length.

Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head_dim 64), block 128, the KV cache
in vLLM's CPU layout (keys dim-major per block). Streaming rows attend S + W keys
(4 sinks + a 1024-token window: up to 1156 live keys); the stock op gets sequences of the same
live length. The three run interleaved (A B C A B C ...); each figure is the median of
``--repeats`` timings of ``--calls`` calls, in process CPU time per call (wall in brackets).

    .venv/bin/python benchmarks/bench_cpu_kernel.py
    .venv/bin/python benchmarks/bench_cpu_kernel.py --dtype float32 --repeats 7
    .venv/bin/python benchmarks/bench_cpu_kernel.py --fp8 --skip-reference   # fp8 caches vs bf16

``--fp8`` adds the kernel on e4m3 and e5m2 caches (the same layout, one byte per element,
k/v scales; q/out in ``--dtype``) to the interleaved set, and prints each one's CPU time
over the ``--dtype`` cache's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from streaming_sink.cpu_attention import load, paged_attention_cpu  # noqa: E402
from streaming_sink.policy import SinkPolicy  # noqa: E402
from streaming_sink.reference_attention import paged_attention_ref  # noqa: E402
from streaming_sink.rope import RotaryParams  # noqa: E402

HQ, HKV, D, BS, S = 9, 3, 64, 128, 4


def cache(blocks: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM CPU_ATTN's cache [blocks, kv_heads, bs, 2D] and our [blocks, bs, kv_heads, D] views of it."""
    kv = torch.randn(blocks, HKV, BS, 2 * D).to(dtype)
    s_b, s_h = kv.stride(0), kv.stride(1)
    k = kv.as_strided((blocks, BS, HKV, D), (s_b, 1, s_h, BS))
    v = kv.as_strided((blocks, BS, HKV, D), (s_b, D, s_h, 1), BS * D)
    return kv, k, v


def case(batch: int, q_len: int, window: int, dtype, fp8: bool = False, reference: bool = True):
    """Callables for one shape: streaming rows at 8 windows in, and stock at the same live length."""
    policy = SinkPolicy(S, window, BS)
    length = 8 * window
    nblk = -(-length // BS)
    kv, k, v = cache(batch * nblk + 1, dtype)
    table = torch.arange(batch * nblk, dtype=torch.int32).view(batch, nblk)
    q = torch.randn(batch * q_len, HQ, D).to(dtype)
    qsl = torch.arange(batch + 1) * q_len
    lens = torch.full((batch,), length)
    rope = RotaryParams.default(D, 1e5)
    fns = {"kernel": lambda: paged_attention_cpu(q, k, v, table, qsl, lens, D ** -0.5, policy, rope)}
    if fp8:  # the same cache layout, one byte per element, read in place with scales
        for name, f8 in (("kernel e4m3", torch.float8_e4m3fn), ("kernel e5m2", torch.float8_e5m2)):
            _, k8, v8 = cache(batch * nblk + 1, f8)
            fns[name] = (lambda k8=k8, v8=v8: paged_attention_cpu(q, k8, v8, table, qsl, lens, D ** -0.5, policy,
                                                                  rope, k_scale=0.02, v_scale=0.03))
    if reference:
        fns["reference"] = lambda: paged_attention_ref(q, k, v, table, qsl, lens, D ** -0.5, policy, rope)
    try:
        import vllm._custom_ops as ops  # the stock op, same live length, dense
    except ImportError:
        return fns
    live = S + window + BS  # sinks + window + the current block at most
    sblk = -(-live // BS)
    skv = torch.randn(batch * sblk + 1, HKV, BS, 2 * D).to(dtype)
    kc, vc = skv.view(skv.shape[0], HKV, 2 * BS, D).chunk(2, dim=2)
    stable = torch.arange(batch * sblk, dtype=torch.int32).view(batch, sblk)
    sqsl, slens, out = qsl.int(), torch.full((batch,), live, dtype=torch.int32), torch.empty_like(q)
    md = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=slens, dtype=dtype,
        query_start_loc=sqsl, causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False)
    fns["stock CPU_ATTN"] = lambda: ops.cpu_attention_with_kv_cache(
        q, kc, vc, out, sqsl, slens, D ** -0.5, True, None, -1, stable, 0.0, md, None)
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--fp8", action="store_true", help="also the kernel on e4m3 / e5m2 caches")
    ap.add_argument("--skip-reference", action="store_true", help="leave the (slow) torch reference out")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    assert load(), "the CPU kernel could not be built (see the warning above)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.dtype}, S={S} W={args.window} "
          f"block {BS}, heads {HQ}/{HKV} x {D}; ms per call: process CPU (wall), median of {args.repeats}")
    for name, batch, q_len in (("decode, batch 16", 16, 1), ("decode, batch 1", 1, 1),
                               ("prefill chunk of 512, batch 1", 1, 512)):
        fns = case(batch, q_len, args.window, dtype, args.fp8, not args.skip_reference)
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                fn()
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[k].append(((time.process_time() - c0) / args.calls * 1e3,
                                 (time.perf_counter() - w0) / args.calls * 1e3))
        row = "  ".join(f"{k} {statistics.median(c for c, _ in t):.3f} ({statistics.median(w for _, w in t):.3f})"
                        for k, t in times.items())
        print(f"{name:<32}{row}")
        base = statistics.median(c for c, _ in times["kernel"])
        for k in ("kernel e4m3", "kernel e5m2"):
            if k in times:
                print(f"{'':<32}{k} / kernel {args.dtype}: {statistics.median(c for c, _ in times[k]) / base:.3f} "
                      f"(process CPU time per call)")


if __name__ == "__main__":
    main()
