"""The CUDA code path of the vLLM adapter, run on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, set by the caller before anything imports Triton).

What runs is what a GPU runs: the policy's backend wrapped around vLLM's own
TRITON_ATTN (``vllm_sink.backend.wrap``): TRITON_ATTN's KV-cache write
(``triton_reshape_and_cache_flash``), its metadata builder (the dense subset of each
step) and its ``unified_attention`` kernel for dense sequences; our builder and the
core's Triton kernel for streaming sequences. The engine config comes from vLLM's
``EngineArgs.create_engine_config`` through the plugin's hook; the rotary module is
vLLM's ``get_rope`` for the tiny model's config, fed ``pos(t)`` by the plugin's
``CachePositionRope``, and its frequencies reach the kernel through
``rope_remap.rotary_params``. What stands in for the engine is the loop below: a
scheduler that feeds three sequences in chunks (decode steps, chunks that cross the
dense->streaming switch, mixed batches) and a block allocator that recycles every
block the policy frees to the other sequences, leaving its stale id in the table.

The queries/keys/values of one attention layer are random (pre-RoPE); the truth is
the float64 token-at-a-time oracle over the same pre-RoPE values (tests/oracle.py).
Prints one JSON object: per-step errors and which steps were all-dense.

``python triton_path_worker.py fp8_e4m3``: the same with an fp8 KV cache, as on a GPU:
TRITON_ATTN writes K/V / scale rounded to fp8 with the layer's k/v scales, and the query
reaches the backend quantized to fp8 with its q scale (vLLM's layer does that for TRITON_ATTN
on CUDA). The oracle is then fed the values the cache and the query held (read back after
each write, dequantized, rotated back from the position they were rotated at), so what is
left is fp32 arithmetic, as for the float32 cache.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import oracle  # noqa: E402
from tiny_models import build_tiny_llama  # noqa: E402

BS, S, W = 32, 4, 64  # block size, sink tokens, window tokens -> dense below 128 tokens
CONTEXT = 128  # the tiny model's max_position_embeddings; streams run >= 8x it
STREAMS = (8 * CONTEXT, 5 * CONTEXT + 37, 2 * CONTEXT + 5)  # three sequences, different lengths
CHUNKS = ((64, 40, 1, 1, 17, 96), (1, 23, 1, 50, 7), (33, 1, 1, 64, 2))  # per-sequence chunk cycles
DECODE_TAIL = 3  # then every stream decodes together, past the window: the CUDA-graph case
DTYPE = torch.float32
KV_DTYPE = sys.argv[1] if len(sys.argv) > 1 else "auto"  # "auto" (float32) or "fp8_e4m3"
FP8 = KV_DTYPE.startswith("fp8")
Q_SCALE, K_SCALE, V_SCALE = (0.02, 0.05, 0.085) if FP8 else (1.0, 1.0, 1.0)  # randn / scale << 448


def main() -> None:
    import vllm_sink  # noqa: F401  (the LLM/EngineArgs keywords)
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_sink import backend, rope_remap
    from vllm_sink.config import policy_of

    model = build_tiny_llama(tempfile.mkdtemp(), max_position_embeddings=CONTEXT, num_hidden_layers=1)
    cfg = EngineArgs(model=model, kv_policy="streaming-sink", sink_tokens=S, sink_window=W, block_size=BS,
                     max_model_len=16 * CONTEXT, attention_backend="TRITON_ATTN", enforce_eager=True,
                     dtype="float32", max_num_seqs=8, kv_cache_dtype=KV_DTYPE).create_engine_config()
    policy = policy_of(cfg)
    assert policy.dense_tokens == 4 * BS, policy
    text = cfg.model_config.hf_text_config
    hq, hkv, d = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    theta = text.rope_parameters["rope_theta"]

    inner = AttentionBackendEnum.TRITON_ATTN.get_class()
    wrapped = backend.wrap(inner)
    backend.SinkBackend.policy = policy
    cache_dtype = torch.uint8 if FP8 else DTYPE  # vLLM's fp8 cache: bytes, viewed as fp8 by the kernels
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=hkv, head_size=d, dtype=cache_dtype)
    g = torch.Generator().manual_seed(7)
    sinks = torch.randn(hq, generator=g)
    impl_args = (hq, d, d ** -0.5, hkv, None, None, KV_DTYPE, None, AttentionType.DECODER, None)
    with set_current_vllm_config(cfg):
        builder = wrapped.get_builder_cls()(spec, ["layers.0"], cfg, torch.device("cpu"))
        impl = wrapped.get_impl_cls()(*impl_args, sinks=sinks)
        stock_builder = inner.get_builder_cls()(spec, ["layers.0"], cfg, torch.device("cpu"))
        stock_impl = inner.get_impl_cls()(*impl_args, sinks=sinks)
        for im in (impl, stock_impl):  # as on CUDA (the CPU platform says False): vLLM's layer
            im.supports_quant_query_input = FP8  # quantizes the query for TRITON_ATTN
        rope = get_rope(d, CONTEXT, True, {"rope_type": "default", "rope_theta": theta}, DTYPE)
        impl.rope = rope_remap.rotary_params(rope, policy, "layers.0")

    # vLLM's cache-write launcher picks its tile size by GPU generation
    # (triton_reshape_and_cache_flash: torch.cuda.get_device_capability(key.device)),
    # which has no answer without a GPU: answer an H100's, as on the machines it targets.
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    # Its fp8 write asks vLLM's platform (the CPU one here) for SM 8.9+ (native fp8e4nv).
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    type(current_platform).get_device_capability = classmethod(lambda cls, device_id=0: DeviceCapability(9, 0))

    class Layer:  # what TRITON_ATTN (and the policy's fp8 read) take of vLLM's Attention layer
        _q_scale, _k_scale, _v_scale = (torch.tensor([x]) for x in (Q_SCALE, K_SCALE, V_SCALE))
        _q_scale_float, _k_scale_float, _v_scale_float = Q_SCALE, K_SCALE, V_SCALE

    # pre-RoPE q/k/v of every token of every stream, and the oracle over them (float64)
    total = [n + DECODE_TAIL for n in STREAMS]
    qkv = [tuple(torch.randn(n, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
           for n in total]
    contract = oracle.Contract(S, BS, W // BS)
    inv64 = oracle.default_inv_freq(d, base=theta)

    # the paged cache (vLLM's logical [blocks, kv_heads, block_size, 2D] view of an NHD store)
    num_blocks = 3 * (policy.dense_blocks + 2) + 4
    # Unwritten and recycled slots hold large finite garbage, as an engine's reused blocks do
    # (finite: vLLM's own kernels load whole tiles and zero the weights of unattended keys,
    # and 0 x NaN would be NaN); a read of one with any weight shows in the error.
    def garbage(*shape):
        x = 50 * torch.randn(*shape, generator=g, dtype=DTYPE)
        return x.clamp(-400, 400).to(torch.float8_e4m3fn).view(torch.uint8) if FP8 else x

    store = garbage(num_blocks, BS, hkv, 2 * d)
    kv_cache = store.permute(0, 2, 1, 3)
    free = list(range(1, num_blocks))  # block 0: vLLM's null block, never handed out
    tables = [[] for _ in STREAMS]  # logical block -> physical id (stale ids stay in the gap)
    owned = [set() for _ in STREAMS]  # logical blocks each sequence still holds
    done = [0] * len(STREAMS)
    steps, step_i, got_rows = [], 0, []
    with HostWorkRecorder() as rec:  # the recorder sees what it must refuse
        torch.ones(2).sum().item()
    recorder_sees = {"syncs": rec.syncs, "allocations": rec.allocations}
    buffers = set()  # storage of the streaming metadata in the all-decode steps
    while any(done[i] < n for i, n in enumerate(total)):
        decode_phase = all(done[i] >= n for i, n in enumerate(STREAMS))
        if decode_phase:
            seqs = list(range(len(STREAMS)))
            chunk = dict.fromkeys(seqs, 1)
        else:
            seqs = [i for i, n in enumerate(STREAMS) if done[i] < n]
            chunk = {i: min(CHUNKS[i][step_i % len(CHUNKS[i])], STREAMS[i] - done[i]) for i in seqs}
        q_rows, k_rows, v_rows, slots, qsl, lens, want_rows = [], [], [], [], [0], [], []
        for i in seqs:
            t = torch.arange(done[i], done[i] + chunk[i])
            for b in range(done[i] // BS, (done[i] + chunk[i] - 1) // BS + 1):
                if b == len(tables[i]):
                    tables[i].append(free.pop(0))
                    owned[i].add(b)
            q, k, v = (x[t].to(DTYPE) for x in qkv[i])
            # CachePositionRope.forward's remap, into the rotary module's pure-torch path
            q, k = rope.forward_native(policy.cache_position(t), q.reshape(len(t), -1), k.reshape(len(t), -1))
            q = q.view(len(t), hq, d)
            if FP8:  # vLLM's layer: static per-tensor quantization with the q scale
                q8 = (q / Q_SCALE).clamp(-448, 448).to(torch.float8_e4m3fn)
                qkv[i][0][t] = _unrotate(q8.double() * Q_SCALE, policy.cache_position(t), inv64)
                q = q8
            q_rows.append(q)
            k_rows.append(k.view(len(t), hkv, d))
            v_rows.append(v)
            slots.append(torch.tensor([tables[i][p // BS] * BS + p % BS for p in t.tolist()]))
            qsl.append(qsl[-1] + chunk[i])
            lens.append(done[i] + chunk[i])
            want_rows.append((i, t, done[i] + chunk[i]))
        q, k, v = torch.cat(q_rows), torch.cat(k_rows), torch.cat(v_rows)
        slot_mapping = torch.cat(slots)
        width = max(len(tables[i]) for i in seqs)
        table = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in seqs], dtype=torch.int32)
        qsl_t = torch.tensor(qsl, dtype=torch.int32)
        lens_t = torch.tensor(lens, dtype=torch.int32)
        m = CommonAttentionMetadata(
            query_start_loc=qsl_t, query_start_loc_cpu=qsl_t.clone(), seq_lens=lens_t, num_reqs=len(seqs),
            num_actual_tokens=len(q), max_query_len=max(chunk.values()), max_seq_len=max(lens),
            block_table_tensor=table, slot_mapping=slot_mapping, seq_lens_cpu_upper_bound=lens_t.clone())
        with set_current_vllm_config(cfg):
            impl.do_kv_cache_update(Layer, k, v, kv_cache, slot_mapping)  # TRITON_ATTN's own write
            if FP8:  # the oracle takes what the cache now holds (the rows are read by later queries)
                for i, t, _ in want_rows:
                    p = torch.tensor([tables[i][x // BS] * BS + x % BS for x in t.tolist()])
                    kv8 = store.view(-1, hkv, 2 * d)[p].view(torch.float8_e4m3fn).double()
                    qkv[i][1][t] = _unrotate(kv8[..., :d] * K_SCALE, policy.cache_position(t), inv64)
                    qkv[i][2][t] = kv8[..., d:] * V_SCALE
            meta = builder.build(0, m)
            out = torch.full((len(q), hq, d), math.nan, dtype=DTYPE)  # as vLLM's layer passes it (model dtype)
            if decode_phase:  # what a captured CUDA graph would replay: no host sync, no allocation
                with HostWorkRecorder() as rec:
                    impl.forward(Layer, q, k, v, kv_cache, meta, out)
                buffers.add(tuple(t.untyped_storage().data_ptr() for t in (
                    meta.streaming.seq_mask, meta.streaming.seq_ids)))
            else:
                impl.forward(Layer, q, k, v, kv_cache, meta, out)
            record = {"decode_phase": decode_phase,
                      "host_syncs": rec.syncs if decode_phase else None,
                      "allocations": rec.allocations if decode_phase else None,
                      "kernel_launches": rec.launches if decode_phase else None,
                      "step": step_i, "seqs": seqs, "chunks": [chunk[i] for i in seqs], "lens": lens,
                      "all_dense": meta.streaming is None,
                      "dense_seqs": int(sum(n <= policy.dense_tokens for n in lens))}
            if meta.streaming is None:  # below the window: the stock backend, bit for bit
                stock_out = torch.full_like(out, math.nan)
                stock_impl.forward(Layer, q, k, v, kv_cache, stock_builder.build(0, m), stock_out)
                record["equal_to_stock"] = bool(torch.equal(out, stock_out))
        got_rows.append((out.view(len(q), hq, d).double(), want_rows))
        steps.append(record)
        print(f"step {step_i}: lens {lens} chunks {[chunk[i] for i in seqs]}", file=sys.stderr, flush=True)
        for i in seqs:  # the engine recycles what the policy frees: blocks behind the window
            done[i] += chunk[i]
            finished = done[i] == total[i]
            keep = set() if finished else set(policy.live_blocks(done[i] // BS))
            for b in sorted(owned[i]):
                if finished or (b not in keep and b < done[i] // BS):
                    owned[i].discard(b)
                    store[tables[i][b]] = garbage(BS, hkv, 2 * d)  # a recycled block: someone else's
                    free.append(tables[i][b])
        step_i += 1
    # the truth, once every token's (cached) values are known: float64, token at a time
    want = [oracle.oracle_attention(q, k, v, contract=contract, inv_freq=inv64, scale=d ** -0.5, sinks=sinks)
            for q, k, v in qkv]
    for record, (got, rows) in zip(steps, got_rows):
        ref = torch.cat([want[i][t] for i, t, _ in rows])
        row_err = (got - ref).abs().amax(dim=(1, 2)).nan_to_num(math.inf)
        # rows of sequences at or below the switch: TRITON_ATTN's (== stock); the others the core's
        dense = torch.cat([torch.full((len(t),), n <= policy.dense_tokens) for _, t, n in rows])
        for key, sel in (("max_row_err", ~dense), ("max_dense_row_err", dense)):
            record[key] = float(row_err[sel].max()) if sel.any() else None
    print(json.dumps({"kv_cache_dtype": KV_DTYPE, "policy": [S, W, BS], "streams": total, "context": CONTEXT, "steps": steps,
                      "decode_buffers_reused": len(buffers) == 1, "recorder_sees": recorder_sees}))


def _unrotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE values of ``x`` [n, H, D] rotated at ``pos`` [n] (float64; neox pairs)."""
    return oracle.rope(x, -pos.to(torch.float64), inv_freq)


class HostWorkRecorder(TorchDispatchMode):
    """Every aten op that runs while it is active, outside kernel launches: those that
    wait for the device (``.item()``, ``nonzero``, ...: a host sync, which a CUDA graph
    cannot capture) and those that allocate (any op that is neither a view nor writes
    into an existing tensor). Triton's own argument handling at a launch is not ours
    and is not recorded (``triton_attention._launch`` pauses the recorder)."""

    SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "repeat_interleave", "unique", "item")

    def __init__(self):
        super().__init__()
        self.syncs, self.allocations, self.launches, self._paused = [], [], 0, False

    def __enter__(self):
        from streaming_sink import triton_attention

        self._original = original = triton_attention._launch

        def launch(*args, **kwargs):
            self.launches += 1
            self._paused = True
            try:
                return original(*args, **kwargs)
            finally:
                self._paused = False

        triton_attention._launch = launch
        return super().__enter__()

    def __exit__(self, *exc):
        from streaming_sink import triton_attention

        triton_attention._launch = self._original
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            name = func.overloadpacket.__name__
            if name in self.SYNCS or any(a is not None and getattr(a, "dtype", None) == torch.bool
                                         for a in args if isinstance(a, torch.Tensor)) and name == "index":
                self.syncs.append(str(func))
            elif not func.is_view and not func._schema.is_mutable:
                self.allocations.append(str(func))
        return func(*args, **(kwargs or {}))


if __name__ == "__main__":
    main()
