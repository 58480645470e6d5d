"""Touch points 2 and 3 (hooks.py): our attention backend, and positions inside the cache.

``StreamingSinkAttnBackend`` is SGLang's ``TorchNativeAttnBackend`` (its KV write, its
per-request SDPA loop) with the contract's attention. Once per step it splits the batch
(the core's ``step_split``, then prefill chunks apart):

* dense requests (``seq_len <= S + W + 1``: every query below the window, keys at their
  natural positions) run torch_native's own ``_run_sdpa_forward_extend`` /
  ``_run_sdpa_forward_decode``, called as stock calls them: stock's outputs, bit for bit;
* prefill chunks of ``PREFILL_MIN_QUERIES`` queries or more past the window run
  ``prefill.chunk_attention`` (one rotation per key instead of one per query and key);
* the rest (decode rows, short chunks) run the core's compiled CPU kernel, reading the
  token pool and ``req_to_token`` in place (attention.py); on CUDA, every row the Triton one.

A model with learned sinks (GPT-OSS), which torch_native cannot compute, sends its dense
requests to the core's paths too.

Per-request sinks: each request has its own ``S`` (state.sink_tokens_of), so its own dense
bound ``S + W + 1``, positions, prefill chunk policy and the kernel's per-sequence
``sink_tokens``; ``remap_positions`` reads them off the step's requests once and leaves them on
``state.step_sinks`` (None when every request has the server's ``S``: the old path; not on the
ForwardBatch, which SGLang's eager runner copies field by field before the forward).
Imports SGLang: loaded only in SGLang's processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from streaming_sink.policy import PolicyConfigError, SinkPolicy
from streaming_sink.rope import RotaryParams
from streaming_sink.rotary_walk import layer_rotaries
from streaming_sink.step_split import StepSplit, split_step

from . import config as sink_config
from .attention import query_start_loc, token_pool_attention
from .prefill import chunk_attention
from .state import state

logger = logging.getLogger("sglang.streaming_sink")

# Below this many queries a chunk goes to the core's kernel: its per-(query, key) rotation
# costs about what chunk_attention's per-key rotation and padding cost there.
PREFILL_MIN_QUERIES = 16


@dataclass
class StepPlan:
    """Which path each request of a step takes (CPU): the core's dense/streaming split,
    then prefill chunks apart. A chunk: (its ``req_to_token`` row, first query row,
    queries, first position) for ``chunk_attention``."""

    split: StepSplit  # dense requests: torch_native's SDPA (layers without learned sinks)
    chunks: list[tuple[int, int, int, int, SinkPolicy]]  # streaming requests' prefill chunks (+ own policy)
    dense_chunks: list[tuple[int, int, int, int, SinkPolicy]]  # dense ones' (learned-sink layers only)
    kernel: torch.Tensor | None  # the other streaming requests: the core's kernel; None: none
    kernel_all: torch.Tensor | None  # every request not in a chunk (learned-sink layers); None: none
    sinks: torch.Tensor | None = None  # per-request S (the kernel's sink_tokens); None: the server's
    max_sinks: int | None = None  # its largest value


class StreamingSinkAttnBackend(TorchNativeAttnBackend):
    """torch_native's KV writes and dense attention; the contract past the window."""

    def __init__(self, model_runner, policy: SinkPolicy):
        super().__init__(model_runner)
        self.policy = policy
        self.ropes = layer_ropes(model_runner.model, policy)
        self.plan: StepPlan | None = None
        self.qsl = None
        self.sinks: torch.Tensor | None = None  # this step's per-request S (CUDA; CPU: in the plan)
        if model_runner.device == "cpu":
            from streaming_sink.cpu_attention import load

            load()  # built once per machine, at startup rather than on the first request

    def init_forward_metadata(self, forward_batch):
        """Once per step: the requests' query offsets and which path each takes."""
        super().init_forward_metadata(forward_batch)
        fb = forward_batch
        self.plan = self.qsl = self.sinks = None
        if fb.seq_lens is None or fb.forward_mode.is_idle():
            return
        extend = fb.forward_mode.is_extend()
        q_lens = fb.extend_seq_lens if extend else torch.ones_like(fb.seq_lens)
        self.qsl = query_start_loc(q_lens)
        sinks = state.take_step_sinks(fb.seq_lens)
        if fb.seq_lens.is_cuda:  # the Triton kernel takes the whole batch
            self.sinks = None if sinks is None else sinks.to(fb.seq_lens.device)
            return
        self.plan = self._plan(fb.seq_lens, self.qsl, fb.req_pool_indices, extend, sinks)

    def _plan(self, seq_lens, qsl, pool_rows, extend: bool, sinks: torch.Tensor | None = None) -> StepPlan:
        lens, starts, rows = seq_lens.tolist(), qsl.tolist(), pool_rows.tolist()
        # each request's own dense bound S + W + 1
        split = split_step(self.policy, seq_lens, qsl, sink_tokens=sinks)
        policies = [self.policy] * len(lens) if sinks is None else [state.policy_for(s) for s in sinks.tolist()]
        chunks, dense_chunks, rest = [], [], []
        for i, (n, row, lo, hi, policy) in enumerate(zip(lens, rows, starts, starts[1:], policies)):
            if extend and hi - lo >= PREFILL_MIN_QUERIES:
                (dense_chunks if n <= policy.dense_tokens else chunks).append(
                    (row, lo, hi - lo, n - (hi - lo), policy))
            else:
                rest.append(i)
        streaming_rest = [i for i in rest if lens[i] > policies[i].dense_tokens]

        def ids(xs):
            return torch.tensor(xs, dtype=torch.long) if xs else None

        return StepPlan(split, chunks, dense_chunks, ids(streaming_rest), ids(rest), sinks,
                        None if sinks is None else int(sinks.max()))

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
        plan = self.plan
        if plan is None:  # CUDA: the core's Triton kernel for every row
            token_pool_attention(q_, k_buf, v_buf, table, fb.req_pool_indices, fb.seq_lens, self.qsl,
                                 layer.scaling, self.policy, rope, o, sinks=sinks, sliding_window=layer_window,
                                 sink_tokens=self.sinks, max_sink_tokens=state.max_sink_tokens)
            return o.view(n, -1)
        chunks, kernel = plan.chunks, plan.kernel
        if sinks is None:  # torch_native has no learned sinks
            if plan.split.any_dense:
                self._stock_rows(q_, o, layer, fb, extend, sw, plan.split.dense_ids, plan.split.dense_rows)
        else:
            chunks, kernel = chunks + plan.dense_chunks, plan.kernel_all
        for row, lo, count, first_t, policy in chunks:  # each with its own S
            chunk_attention(q_[lo:lo + count], k_buf, v_buf, table[row], first_t, layer.scaling, policy,
                            rope, o[lo:lo + count], sinks=sinks, sliding_window=layer_window)
        if kernel is not None:
            token_pool_attention(q_, k_buf, v_buf, table, fb.req_pool_indices, fb.seq_lens, self.qsl,
                                 layer.scaling, self.policy, rope, o, sinks=sinks, sliding_window=layer_window,
                                 seq_ids=kernel, sink_tokens=plan.sinks, max_sink_tokens=plan.max_sinks)
        return o.view(n, -1)

    def _stock_rows(self, q_, o, layer, fb, extend, sw, dense, rows):
        """torch_native's own per-request SDPA loop for the dense requests (ids ``dense``,
        query ``rows``; both None: every request), called as stock SGLang calls it."""
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


def layer_ropes(model, policy: SinkPolicy) -> dict[int, RotaryParams]:
    """Each RadixAttention layer's rotary frequencies (the core's rotary walk: the
    ``rotary_emb`` beside it; Gemma 3: one per layer type, its own base); refuses a
    layer window past W + 1 (SGLang's ``sliding_window_size`` counts sw + 1 keys)."""
    ropes = {}
    for found in layer_rotaries(model, lambda m: isinstance(m, RadixAttention), policy):
        ropes[found.layer.layer_id] = found.params
        sw = getattr(found.layer, "sliding_window_size", None)
        if sw is not None and sw > -1:
            policy.check_layer_window(sw + 1, f"attention layer {found.layer.layer_id}")
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
    state.max_sink_tokens = sink_config.max_sink_tokens_of(model_runner.server_args)
    backend = StreamingSinkAttnBackend(model_runner, policy)
    logger.info("streaming-sink: %s; %d attention layers use positions inside the cache",
                policy.describe(), len(backend.ropes))
    return backend


def remap_positions(result, cls, batch, *args, **kwargs):
    """AFTER ``ForwardBatch.init_new``: positions -> ``pos(t)`` (each request's own ``S``),
    so the model's own RoPE writes every key at its cache position (state.policy is set
    with the backend, before any forward). The step's per-request ``S`` stays on the
    scheduler state (``state.step_sinks``) for the backend's next ``init_forward_metadata``."""
    policy = state.policy
    state.step_sinks = None
    if policy is None or result.positions is None:
        return result
    per_req = [state.sink_tokens_of(req) for req in batch.reqs]
    if all(s == policy.sink_tokens for s in per_req):
        result.positions = policy.cache_position(result.positions)
        return result
    if len(per_req) != len(result.seq_lens):
        raise RuntimeError(f"streaming-sink: {len(per_req)} requests for {len(result.seq_lens)} sequences")
    sinks = torch.tensor(per_req, dtype=torch.int64)
    state.step_sinks = (len(per_req), sinks)
    per_token = sinks.to(result.positions.device)
    if result.forward_mode.is_extend():  # a request's S for each of its queries
        per_token = torch.repeat_interleave(per_token, result.extend_seq_lens.to(per_token.device).long())
    result.positions = policy.cache_position(result.positions, per_token.to(result.positions.dtype))
    return result
