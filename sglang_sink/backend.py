"""Touch points 2 and 3 (hooks.py): our attention backend, and positions inside the cache.

``StreamingSinkAttnBackend`` is SGLang's ``TorchNativeAttnBackend`` (its KV write, its
per-request SDPA loop) with the contract's attention. Once per step it splits the batch:

* dense requests (``seq_len <= S + W + 1``: every query below the window, keys at their
  natural positions) run torch_native's own ``_run_sdpa_forward_extend`` /
  ``_run_sdpa_forward_decode``, called as stock calls them: stock's outputs, bit for bit;
* prefill chunks of ``PREFILL_MIN_QUERIES`` queries or more past the window run
  ``prefill.chunk_attention`` (one rotation per key instead of one per query and key);
* the rest (decode rows, short chunks) run the core's compiled CPU kernel, reading the
  token pool and ``req_to_token`` in place (attention.py); on CUDA, every row the Triton one.

A model with learned sinks (GPT-OSS), which torch_native cannot compute, sends its dense
requests to the core's paths too. Imports SGLang: loaded only in SGLang's processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from streaming_sink.cpu_attention import query_rows
from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.rope import params_from_cos_sin_table

from . import config as sink_config
from .attention import query_start_loc, token_pool_attention
from .prefill import chunk_attention
from .state import state

logger = logging.getLogger("sglang.streaming_sink")

# Below this many queries a chunk goes to the core's kernel: its per-(query, key) rotation
# costs about what chunk_attention's per-key rotation and padding cost there.
PREFILL_MIN_QUERIES = 16


@dataclass
class StepSplit:
    """Which path each request of a step takes (CPU). ``chunks``: (its ``req_to_token`` row,
    first query row, queries, first position) of prefill chunks for ``chunk_attention``."""

    dense: torch.Tensor | None  # mask of dense requests (torch_native's SDPA); None: none
    dense_rows: torch.Tensor | None  # their query rows
    chunks: list[tuple[int, int, int, int]]  # streaming requests
    dense_chunks: list[tuple[int, int, int, int]]  # dense ones (learned-sink layers only)
    kernel: torch.Tensor | None  # the other streaming requests; None: none
    kernel_all: torch.Tensor | None  # every request not in a chunk (learned-sink layers); None: none


class StreamingSinkAttnBackend(TorchNativeAttnBackend):
    """torch_native's KV writes and dense attention; the contract past the window."""

    def __init__(self, model_runner, policy: SinkPolicy):
        super().__init__(model_runner)
        self.policy = policy
        self.ropes = layer_ropes(model_runner.model, policy)
        self.split: StepSplit | None = None
        self.qsl = None
        if model_runner.device == "cpu":
            from streaming_sink.cpu_attention import load

            load()  # built once per machine, at startup rather than on the first request

    def init_forward_metadata(self, forward_batch):
        """Once per step: the requests' query offsets and which path each takes."""
        super().init_forward_metadata(forward_batch)
        fb = forward_batch
        self.split = self.qsl = None
        if fb.seq_lens is None or fb.forward_mode.is_idle():
            return
        extend = fb.forward_mode.is_extend()
        q_lens = fb.extend_seq_lens if extend else torch.ones_like(fb.seq_lens)
        self.qsl = query_start_loc(q_lens)
        if fb.seq_lens.is_cuda:
            return  # the Triton kernel takes the whole batch
        self.split = self._split(fb.seq_lens, self.qsl, fb.req_pool_indices, extend)

    def _split(self, seq_lens, qsl, pool_rows, extend: bool) -> StepSplit:
        dense = seq_lens <= self.policy.dense_tokens
        in_chunk = torch.zeros_like(dense)
        chunks, dense_chunks = [], []
        starts = qsl.tolist()
        for i, (n, row, lo, hi) in enumerate(zip(seq_lens.tolist(), pool_rows.tolist(), starts, starts[1:])):
            if extend and hi - lo >= PREFILL_MIN_QUERIES:
                in_chunk[i] = True
                (dense_chunks if n <= self.policy.dense_tokens else chunks).append((row, lo, hi - lo, n - (hi - lo)))
        any_dense = bool(dense.any())
        dense_rows = None
        if any_dense and not bool(dense.all()):
            dense_rows, _ = query_rows(qsl, torch.nonzero(dense).flatten())
        kernel = torch.nonzero(~dense & ~in_chunk).flatten()
        kernel_all = torch.nonzero(~in_chunk).flatten()
        return StepSplit(dense if any_dense else None, dense_rows, chunks, dense_chunks,
                         kernel if kernel.numel() else None, kernel_all if kernel_all.numel() else None)

    def _run(self, q, k, v, layer, fb, save_kv_cache, extend, sinks=None, **_):
        if layer.qk_head_dim != layer.v_head_dim or layer.is_cross_attention:
            raise PolicyConfigError("--kv-policy streaming-sink supports decoder self-attention "
                                    "with equal q/k/v head sizes only")
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, self.swa_out_cache_loc), k, v)
        n = q.shape[0] if q.dim() == 3 else q.numel() // (layer.tp_q_head_num * layer.qk_head_dim)
        q_ = q.reshape(n, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty_like(q_)
        sw = layer.sliding_window_size  # SGLang's window counts back from the query: sw + 1 keys
        sw = sw if sw is not None and sw > -1 else None
        layer_window = sw + 1 if sw is not None else None  # the core's: keys with t - k < layer_window
        table = self.req_to_token_pool.req_to_token
        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        rope = self.ropes[layer.layer_id]
        split = self.split
        if split is None:  # CUDA: the core's Triton kernel for every row
            token_pool_attention(q_, k_buf, v_buf, table, fb.req_pool_indices, fb.seq_lens, self.qsl,
                                 layer.scaling, self.policy, rope, o, sinks=sinks, sliding_window=layer_window)
            return o.view(n, -1)
        chunks, kernel = split.chunks, split.kernel
        if sinks is None:  # torch_native has no learned sinks
            if split.dense is not None:
                self._stock_rows(q_, o, layer, fb, extend, sw, split.dense, split.dense_rows)
        else:
            chunks, kernel = chunks + split.dense_chunks, split.kernel_all
        for row, lo, count, first_t in chunks:
            chunk_attention(q_[lo:lo + count], k_buf, v_buf, table[row], first_t, layer.scaling, self.policy,
                            rope, o[lo:lo + count], sinks=sinks, sliding_window=layer_window)
        if kernel is not None:
            token_pool_attention(q_, k_buf, v_buf, table, fb.req_pool_indices, fb.seq_lens, self.qsl,
                                 layer.scaling, self.policy, rope, o, sinks=sinks, sliding_window=layer_window,
                                 seq_ids=kernel)
        return o.view(n, -1)

    def _stock_rows(self, q_, o, layer, fb, extend, sw, dense, rows):
        """torch_native's own per-request SDPA loop for the dense requests (mask ``dense``,
        query ``rows``; ``rows`` None: every request), called as stock SGLang calls it."""
        reqs = dict(req_pool_indices=fb.req_pool_indices, seq_lens=fb.seq_lens)
        if extend:
            reqs.update(extend_prefix_lens=fb.extend_prefix_lens, extend_seq_lens=fb.extend_seq_lens)
        q_sub, o_sub = q_, o
        if rows is not None:
            reqs = {key: val[dense] for key, val in reqs.items()}
            q_sub = q_[rows]
            o_sub = torch.empty_like(q_sub)
        run = self._run_sdpa_forward_extend if extend else self._run_sdpa_forward_decode
        run(q_sub, o_sub, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), self.req_to_token_pool.req_to_token,
            **reqs, encoder_lens=None, scaling=layer.scaling,
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num, causal=extend,
            is_cross_attn=False, sliding_window_size=sw)
        if rows is not None:
            o[rows] = o_sub

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, True, **kw)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, False, **kw)


def layer_ropes(model, policy: SinkPolicy) -> dict:
    """Each RadixAttention layer's rotary frequencies, from the ``rotary_emb`` beside it
    (Gemma 3: one per layer type, its own base); refuses a layer window past W + 1."""
    ropes, layers = {}, []
    by_module: dict[int, object] = {}  # one table read per rotary module (shared by SGLang's get_rope)
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if not isinstance(child, RadixAttention):
                continue
            layers.append(f"{parent_name}.{child_name}")
            rope = getattr(parent, "rotary_emb", None)
            if rope is None or not all(hasattr(rope, a) for a in ("rotary_dim", "is_neox_style", "cos_sin_cache")):
                continue
            if id(rope) not in by_module:
                table = rope._compute_cos_sin_cache()  # float32, before any dtype cast
                by_module[id(rope)] = params_from_cos_sin_table(
                    table, rope.rotary_dim, rope.is_neox_style, policy, f"{parent_name}.{child_name}")
            ropes[child.layer_id] = by_module[id(rope)]
            sw = getattr(child, "sliding_window_size", None)  # SGLang's: sw + 1 keys
            if sw is not None and sw > -1:
                policy.check_layer_window(sw + 1, f"attention layer {child.layer_id}")
    if len(ropes) != len(layers):
        raise PolicyConfigError(
            f"--kv-policy streaming-sink needs RoPE attention; {len(layers) - len(ropes)} attention "
            f"layer(s) have no standard rotary embedding beside them")
    return ropes


# ---- the hooks ------------------------------------------------------------------------------

def build_backend(original, *, model_runner, backend_str, init_new_workspace):
    """AROUND ``_build_full_attention_backend_from_str``: ours when the policy is on."""
    policy = sink_config.policy_of(model_runner.server_args)
    if policy is None:
        return original(model_runner=model_runner, backend_str=backend_str,
                        init_new_workspace=init_new_workspace)
    model_runner.init_new_workspace = init_new_workspace
    state.policy = policy  # this process serves a model under the policy: the other hooks act
    backend = StreamingSinkAttnBackend(model_runner, policy)
    logger.info("streaming-sink: %s; %d attention layers use positions inside the cache",
                policy.describe(), len(backend.ropes))
    return backend


def remap_positions(result, cls, batch, *args, **kwargs):
    """AFTER ``ForwardBatch.init_new``: positions -> ``pos(t)``, so the model's own RoPE
    writes every key at its cache position (state.policy is set with the backend, before
    any forward)."""
    if state.policy is not None and result.positions is not None:
        result.positions = state.policy.cache_position(result.positions)
    return result
