"""GPU benchmark: Triton paged sink+window attention vs torch SDPA (flash).

    python benchmarks/bench_triton_attention.py            # full decode grid + prefill
    python benchmarks/bench_triton_attention.py --batches 1 16 --windows 4096 --reps 20

Setup: bf16, head_dim 128, 32 query / 8 KV heads (GQA 4:1), KV block 16, 4 sink
tokens, vLLM's per-layer cache layout ([num_blocks, block_size, Hkv, 2*D] viewed
as K/V), block tables shuffled, every sequence deep in the streaming regime so
each query reads the sinks + the full window (+ its own partial block).

* decode: one query per sequence, batch x window grid. Reported: median time
  (CUDA events, L2 flushed before every run), the bytes the kernel must move
  (the KV blocks it reads + q + out) per second, and that as a fraction of the
  device's copy bandwidth measured in this run (read + write of a 2 GiB
  buffer). Baseline: ``F.scaled_dot_product_attention`` (flash backend, native
  GQA) over a contiguous KV of the same number of keys.
* prefill: a 2048-token chunk over a 4096 window (batch 1). Baseline: SDPA flash,
  non-causal, the same 2048 queries over a contiguous KV of S + W keys -- the
  same FLOPs as the kernel (every query attends S + W + its block prefix).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from streaming_sink.policy import SinkPolicy  # noqa: E402
from streaming_sink.rope import RotaryParams  # noqa: E402

HQ, HKV, D, BS, SINKS = 32, 8, 128, 16, 4
DTYPE = torch.bfloat16


def bench(fn, reps: int, flush: torch.Tensor | None, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()  # evict the KV from L2 (50 MiB on H100)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(reps: int) -> float:
    """Device memory bandwidth in bytes/s: a 2 GiB device-to-device copy (read + write)."""
    n = 1 << 30  # bf16 elements -> 2 GiB
    src = torch.empty(n, dtype=DTYPE, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), reps, None)
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


def paged_setup(batch: int, window: int, q_len: int, device="cuda", seed=0):
    """Paged K/V (vLLM layout), block table and metadata for ``batch`` sequences deep
    in the streaming regime, each with ``q_len`` queries at its end."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    policy = SinkPolicy(SINKS, window, BS)
    seq_len = 3 * policy.dense_tokens + 5
    first_block = (seq_len - q_len) // BS
    last_block = (seq_len - 1) // BS
    live = sorted({b for j in range(first_block, last_block + 1) for b in policy.live_blocks(j)})
    nb_table = last_block + 1
    num_blocks = batch * len(live) + 1  # block 0: what the freed gap still points at
    kv = torch.empty(num_blocks, BS, HKV, 2 * D, dtype=DTYPE, device=device).normal_()
    k_cache, v_cache = kv.split(D, dim=-1)  # = vLLM's kv_cache.transpose(1, 2).split(D, -1)
    table = torch.zeros(batch, nb_table, dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    table[:, live] = perm.view(batch, len(live)).to(torch.int32)
    q = torch.randn(batch * q_len, HQ, D, generator=g).to(device=device, dtype=DTYPE)
    qsl = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * q_len
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    rope = RotaryParams.default(D)
    rope = RotaryParams(rope.inv_freq.to(device), rope.rotary_dim, rope.is_neox_style)
    # bytes the kernel has to move: every live block (K and V), q in, out
    pages_per_query_block = policy.sink_blocks + policy.window_blocks + 1
    kv_bytes = batch * pages_per_query_block * BS * HKV * D * 2 * 2
    io_bytes = 2 * q.numel() * q.element_size()
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table.to(device), query_start_loc=qsl,
                seq_lens=seq_lens, policy=policy, rope=rope), kv_bytes + io_bytes, kv


def sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """SDPA restricted to the flash backend with native GQA; falls back (and says so)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    try:
        flash()
        return flash, "flash"
    except RuntimeError:
        kk, vv = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))

        def any_backend():
            return F.scaled_dot_product_attention(q, kk, vv)

        any_backend()
        return any_backend, "default (K/V expanded)"


def run_decode(args, bw: float, flush) -> None:
    from streaming_sink.triton_attention import _auto_splits, paged_attention

    print(f"\n## decode: bf16, D={D}, {HQ}q/{HKV}kv heads, block {BS}, S={SINKS}; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")
    hdr = (f"{'batch':>5} {'window':>6} {'keys':>6} {'splits':>6} | {'ours us':>8} {'GB/s':>6} {'%copy':>6} | "
           f"{'sdpa us':>8} {'GB/s':>6} {'%copy':>6} | {'sdpa/ours':>9}")
    print(hdr)
    print("-" * len(hdr))
    for window in args.windows:
        for batch in args.batches:
            kw, nbytes, kv = paged_setup(batch, window, 1)
            out = torch.empty_like(kw["q"])
            grid0 = batch  # decode: one program per (sequence, KV head) before splitting
            splits = _auto_splits(kw["q"], grid0 * HKV, kw["policy"].dense_blocks)
            ours = bench(lambda: paged_attention(scale=D ** -0.5, out=out, **kw), args.reps, flush)
            keys = SINKS + window + kw["policy"].block_size  # what SDPA reads: a comparable key count
            q4 = kw["q"].view(batch, HQ, 1, D)
            k4 = torch.empty(batch, HKV, keys, D, dtype=DTYPE, device="cuda").normal_()
            v4 = torch.empty_like(k4).normal_()
            fn, backend = sdpa_fn(q4, k4, v4)
            base = bench(fn, args.reps, flush)
            base_bytes = 2 * k4.numel() * 2 + 2 * q4.numel() * 2
            print(f"{batch:>5} {window:>6} {keys:>6} {splits:>6} | {ours * 1e3:>8.1f} "
                  f"{nbytes / ours / 1e6:>6.0f} {100 * nbytes / ours / 1e-3 / bw:>5.0f}% | "
                  f"{base * 1e3:>8.1f} {base_bytes / base / 1e6:>6.0f} {100 * base_bytes / base / 1e-3 / bw:>5.0f}% | "
                  f"{base / ours:>8.2f}x")
            del kw, kv, k4, v4, out
            torch.cuda.empty_cache()
    print(f"(SDPA backend: {backend})")


def run_prefill(args, flush) -> None:
    from streaming_sink.triton_attention import paged_attention

    chunk, window = args.chunk, args.prefill_window
    kw, _, kv = paged_setup(1, window, chunk)
    policy = kw["policy"]
    seq_len = int(kw["seq_lens"][0])
    keys_per_query = [SINKS + (t - policy.window_start(t // BS)) + 1 for t in range(seq_len - chunk, seq_len)]
    flops = 4 * HQ * D * sum(keys_per_query)
    out = torch.empty_like(kw["q"])
    ours = bench(lambda: paged_attention(scale=D ** -0.5, out=out, **kw), args.reps, flush)
    q4 = kw["q"].view(1, chunk, HQ, D).transpose(1, 2)
    k4 = torch.empty(1, HKV, SINKS + window, D, dtype=DTYPE, device="cuda").normal_()
    v4 = torch.empty_like(k4).normal_()
    fn, backend = sdpa_fn(q4, k4, v4)
    base = bench(fn, args.reps, flush)
    base_flops = 4 * HQ * D * chunk * (SINKS + window)
    print(f"\n## prefill: {chunk}-token chunk over a {window} window (streaming regime), bf16, "
          f"D={D}, {HQ}q/{HKV}kv heads")
    hdr = f"{'':>10} | {'ms':>8} {'TFLOP/s':>8}"
    print(hdr)
    print("-" * len(hdr))
    print(f"{'ours':>10} | {ours:>8.3f} {flops / ours / 1e9:>8.1f}")
    print(f"{'sdpa':>10} | {base:>8.3f} {base_flops / base / 1e9:>8.1f}   ({backend}, non-causal over S+W keys)")
    print(f"sdpa/ours time: {base / ours:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    p.add_argument("--windows", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--prefill-window", type=int, default=4096)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between runs")
    p.add_argument("--skip", choices=["decode", "prefill"], default=None)
    args = p.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_triton_attention: no CUDA GPU visible (torch.cuda.is_available() is False); "
                 "this benchmark only runs on a GPU.")
    import triton

    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    flush = None if args.no_flush else torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    bw = copy_bandwidth(args.reps)
    if args.skip != "decode":
        run_decode(args, bw, flush)
    if args.skip != "prefill":
        run_prefill(args, flush)


if __name__ == "__main__":
    main()
