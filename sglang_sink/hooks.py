"""Every touch of SGLang internals, in one place.

Checked against sglang 0.5.23 (tested here, CPU). Any other version: the flags
still parse, and ``--kv-policy streaming-sink`` refuses to start, saying so.
Hooks go through SGLang's own ``HookRegistry`` (AROUND/AFTER), applied by
``load_plugins()`` in every SGLang process. The touch points:

1. ``ServerArgs.add_cli_args`` / ``from_cli_args`` and ``Engine.server_args_class``:
   the flags on the stock launcher (and ``--help``), the same keywords for
   ``sglang.Engine``; the policy is resolved and every refusal raised there, at
   startup, in the main process (ServerArgs is a msgspec Struct: no new fields, so
   the settings ride as one extra attribute, which SGLang pickles to its children).
   The rule: a flag the user set is honoured or refused naming it; only a default is
   changed, in one log line. ServerArgs is still unresolved there (SGLang 0.5.23
   declares its own defaults in ``resolve_once``, later), so a set field is the user's.
2. ``attention_backend_setup._build_full_attention_backend_from_str``: with the
   policy on, our backend instead of the one named by ``--attention-backend``: a
   ``TorchNativeAttnBackend`` subclass (its KV write, ``init_forward_metadata``, and its
   ``_run_sdpa_forward_extend`` / ``_run_sdpa_forward_decode`` for requests below the
   window); the other requests go to the core's kernel.
3. ``ForwardBatch.init_new``: positions become cache positions ``pos(t)``.
4. ``ScheduleBatch.maybe_evict_swa`` (SGLang's per-step "free out-of-window slots"
   call, before each allocation): frees the blocks the window left, floor at the sinks.
5. ``BasePrefixCache.free_kv_row``: the final release skips slots already freed.
6. ``BaseTokenToKVPoolAllocator.max_new_tokens_for_memory``, ``PrefillBudget.check_prefill``
   and ``.reserve``, ``PrefillAdder.add_one_req`` and ``._get_running_request_total_token_offset``
   (what running requests still claim): a request's KV demand is its live
   bound, not its length (``ignore_eos`` requests take the same admission path, since
   SGLang's ignore-eos estimate assumes every generated token stays in the pool).
7. ``TpModelWorker.get_worker_info``: the longest request is ``--context-length``, not
   the KV pool's size (SGLang caps both; only the first still applies with the policy on).
8. The radix cache (prefix reuse), on unless ``--disable-radix-cache``: registered with
   SGLang's public ``mem_cache.registry.register_radix_cache_backend`` as
   ``streaming-sink`` and selected by setting ``--radix-cache-backend`` (a default only:
   another backend, LMCache, FlexKV or the unified-cache linker is refused, naming the
   flag). The cache, ``radix.py``, subclasses ``mem_cache.radix_cache.RadixCache`` and
   relies on its ``_match_prefix_helper``, ``_insert_helper``, ``_delete_leaf``,
   ``inc_lock_ref`` / ``dec_lock_ref``, ``evictable_leaves``, ``eviction_strategy``,
   ``evictable_size_``, ``root_node``, ``_empty_match_result``, ``kv_events``, on
   ``ReqKvInfo.cache_protected_len`` / ``cache_inserted_len`` and on ``RadixKey`` slicing
   (``_RADIX_NAMES``, checked at startup like the hook targets). Touch points 4/5 take
   ``cache_protected_len`` as the start of what a request owns.
9. ``observability.metrics_collector.SchedulerMetricsCollector.init_new`` (AFTER): with
   ``--enable-metrics``, the policy's Prometheus series (``metrics.py``) are created in
   the scheduler next to SGLang's own, with its labels, where it publishes its own
   (``current_scheduler_metrics_enabled``); touch points 4/5 update them, and SGLang's
   ``/metrics`` exports them (multiprocess directory).
"""

from __future__ import annotations

import json
import logging
import os

from streaming_sink.policy import PolicyConfigError, SinkPolicy, check_flags
from streaming_sink.rope import params_from_cos_sin_table

from . import config as sink_config
from .metrics import SinkMetrics
from .pool import EvictionCursor

# A child of "sglang" so our lines go through SGLang's own log handlers.
logger = logging.getLogger("sglang.streaming_sink")

CHECKED_SGLANG_VERSIONS = ("0.5.23",)
RADIX_BACKEND = "streaming-sink"  # our radix cache, under SGLang's --radix-cache-backend registry
TRACE_ENV = "SGLANG_SINK_TRACE"  # diagnostics: JSON lines of KV slots in use, per step
_installed = False
_active: SinkPolicy | None = None  # the policy of this scheduler process's model
_cursors: dict[int, tuple[object, EvictionCursor]] = {}  # id(req.kv) -> (req.kv, cursor)
_metrics: SinkMetrics | None = None  # this scheduler's Prometheus series (--enable-metrics)

_TARGETS = {  # dotted SGLang name -> (hook type, our function name)
    "sglang.srt.server_args.ServerArgs.add_cli_args": ("AROUND", "_add_cli_args"),
    "sglang.srt.server_args.ServerArgs.from_cli_args": ("AROUND", "_from_cli_args"),
    "sglang.srt.model_executor.model_runner_components.attention_backend_setup."
    "_build_full_attention_backend_from_str": ("AROUND", "_build_backend"),
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new": ("AFTER", "_remap_positions"),
    "sglang.srt.managers.schedule_batch.ScheduleBatch.maybe_evict_swa": ("AROUND", "_evict"),
    "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row": ("AROUND", "_free_kv_row"),
    "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.max_new_tokens_for_memory":
        ("AROUND", "_max_new_tokens_for_memory"),
    "sglang.srt.mem_cache.prefill_budget.PrefillBudget.check_prefill": ("AROUND", "_check_prefill"),
    "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req": ("AROUND", "_add_one_req"),
    "sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset":
        ("AROUND", "_running_offset"),
    "sglang.srt.mem_cache.prefill_budget.PrefillBudget.reserve": ("AROUND", "_reserve"),
    "sglang.srt.managers.tp_worker.TpModelWorker.get_worker_info": ("AFTER", "_worker_info"),
    "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.init_new":
        ("AFTER", "_metrics_collector"),
}


_FLAG_TARGETS = [t for t in _TARGETS if ".server_args." in t]


def sglang_version() -> str:
    import sglang

    return sglang.__version__.split("+")[0]


def check_version() -> None:
    version = sglang_version()
    if version not in CHECKED_SGLANG_VERSIONS:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink was checked against SGLang {', '.join(CHECKED_SGLANG_VERSIONS)}; "
            f"the installed SGLang is {version}. Install a checked version "
            f"(pip install 'streaming-sink[sglang]') or run without --kv-policy.")


_RADIX_NAMES = {  # what radix.py uses of SGLang's RadixCache (touch point 8)
    "sglang.srt.mem_cache.radix_cache.RadixCache": (
        "_match_prefix_helper", "_insert_helper", "_delete_leaf", "_split_node", "inc_lock_ref",
        "dec_lock_ref", "path_device_indices", "insert", "lock", "unlock", "reset"),
    "sglang.srt.mem_cache.registry": ("register_radix_cache_backend", "get_radix_cache_factory"),
    "sglang.srt.mem_cache.base_prefix_cache": ("MatchResult", "InsertParams", "EvictResult"),
}


def _missing_radix_names() -> list[str]:
    import importlib

    missing = []
    for where, names in _RADIX_NAMES.items():
        module, _, cls = where.rpartition(".") if where.endswith("RadixCache") else (where, "", "")
        try:
            obj = importlib.import_module(module)
            obj = getattr(obj, cls) if cls else obj
        except (ImportError, AttributeError):
            missing.append(where)
            continue
        missing += [f"{where}.{n}" for n in names if not hasattr(obj, n)]
    return missing


def check_hooks_applied() -> None:
    """HookRegistry logs and skips a target it cannot patch; we refuse to start instead."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [t for t in _TARGETS if t not in HookRegistry._patched] + _missing_radix_names()
    if missing:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink: SGLang {sglang_version()} lacks {', '.join(missing)}")


def install() -> None:
    """Registers the hooks; ``load_plugins()`` applies them right after."""
    global _installed
    if _installed:
        return
    _installed = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    checked = sglang_version() in CHECKED_SGLANG_VERSIONS
    if not checked:
        logger.warning("streaming-sink: SGLang %s is not a checked version (%s); "
                       "--kv-policy streaming-sink will refuse to start",
                       sglang_version(), ", ".join(CHECKED_SGLANG_VERSIONS))
    for target, (kind, name) in _TARGETS.items():
        if checked or target in _FLAG_TARGETS:  # other versions: flags only, which refuse
            HookRegistry.register(target, globals()[name], HookType[kind])
    if checked:  # SGLang's public registry of radix caches (touch point 8)
        from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

        if get_radix_cache_factory(RADIX_BACKEND) is None:
            register_radix_cache_backend(RADIX_BACKEND, _radix_cache)
    # Not through HookRegistry: it would also rebind every module's ``ServerArgs``
    # name to our function. A plain function attribute: Engine calls it as a method.
    from sglang.srt.entrypoints.engine import Engine

    Engine.server_args_class = _engine_server_args


# ---- 1: flags, refusals, engine defaults (main process) --------------------

def add_flags(parser) -> None:
    group = parser.add_argument_group(
        "streaming-sink", "StreamingLLM attention sinks: stream past the context window "
        "with bounded KV memory (docs/sglang.md).")
    group.add_argument("--kv-policy", choices=["none", "streaming-sink"], default="none",
                       help="KV cache policy. 'streaming-sink' pins the first --sink-tokens "
                            "tokens and keeps a sliding window of recent KV slots.")
    group.add_argument("--sink-tokens", type=int, default=None,
                       help="Tokens kept forever as attention sinks; None (the default) means 4 "
                            "(0: plain window attention, the baseline that collapses).")
    group.add_argument("--sink-window", type=int, default=None,
                       help="Recent tokens kept; None (the default) means the largest window the "
                            "model's rotary table allows.")


def _add_cli_args(original, parser, *args, **kwargs):
    result = original(parser, *args, **kwargs)
    add_flags(parser)
    return result


def _from_cli_args(original, cls, args):
    server_args = original(cls, args)
    apply_flags(server_args, {f: getattr(args, f, None) for f in sink_config.FLAGS})
    return server_args


def _engine_server_args(engine, *args, kv_policy=None, sink_tokens=None, sink_window=None, **kwargs):
    """``sglang.Engine(**kwargs)`` builds its ServerArgs through this class attribute
    (looked up after Engine.__init__ loads plugins); ServerArgs refuses unknown keywords."""
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(*args, **kwargs)
    apply_flags(server_args, {"kv_policy": kv_policy, "sink_tokens": sink_tokens, "sink_window": sink_window})
    return server_args


def apply_flags(server_args, flags: dict) -> None:
    """Checks the flags, refuses what the policy cannot serve (naming the flag), sets
    the engine defaults it needs and attaches the resolved policy. Before SGLang's
    own resolution, in the main process: every refusal happens at startup."""
    opts = check_flags(**flags)
    if opts is None:
        return
    check_version()
    check_hooks_applied()
    _refuse_state_layers(server_args.model_path)
    _streaming_defaults(server_args, _architectures(server_args.model_path))
    rotary_len = _rotary_table_len(server_args.model_path)
    policy = SinkPolicy.resolve(opts["sink_tokens"], opts["sink_window"], 1, rotary_len, "the model")
    _refuse_long_layer_windows(server_args.model_path, policy)
    setattr(server_args, sink_config.ATTR, {**opts, "window_tokens": policy.window_tokens, "block_size": 1})
    logger.info("%s; context_length %s", policy.describe(), server_args.context_length)


# Our backend subclasses this SGLang backend: naming it explicitly is honoured.
BASE_ATTENTION_BACKEND = "torch_native"
_BACKEND_FLAGS = (("attention_backend", "--attention-backend"),
                  ("prefill_attention_backend", "--prefill-attention-backend"),
                  ("decode_attention_backend", "--decode-attention-backend"))
# Models whose SGLang 0.5.23 config check demands a backend name from a list
# (arg_groups/model_hook.py, GptOssForCausalLM): where SGLang's own default is not on
# it (e.g. an arm64 CPU: torch_native), the user must name one. Such a name is the
# model's demand, not a choice of attention: accepted, and replaced by ours (logged).
_MODEL_FORCED_BACKENDS = {
    "GptOssForCausalLM": ("triton", "trtllm_mha", "fa3", "fa4", "ascend", "intel_amx", "intel_xpu", "aiter"),
}


def _explicit_backends(sa, architectures) -> list[str]:
    """Refuses an explicit attention backend the policy cannot honour (ours is a
    ``torch_native`` subclass), naming the flag; returns the accepted model-forced ones.
    ServerArgs is unresolved here (SGLang resolves after us), so a set value is the
    user's: SGLang's own default (e.g. intel_amx on x86 CPUs, fa3 for GPT-OSS on H100)
    is declared later, and ours replaces it as a default."""
    forced = set().union(*(_MODEL_FORCED_BACKENDS.get(a, ()) for a in architectures))
    given = [(flag, getattr(sa, field, None)) for field, flag in _BACKEND_FLAGS]
    given = [(flag, v) for flag, v in given if v not in (None, BASE_ATTENTION_BACKEND)]
    refused = [f"{flag} {v}" for flag, v in given if v not in forced]
    if refused:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink runs its own attention backend (a subclass of SGLang's "
            f"{BASE_ATTENTION_BACKEND}); it cannot honour {', '.join(refused)}. Drop the flag "
            f"(the policy picks its backend) or pass {BASE_ATTENTION_BACKEND}")
    return [f"{flag} {v}" for flag, v in given]


def _architectures(model_path: str) -> list[str]:
    from transformers import AutoConfig

    return list(getattr(AutoConfig.from_pretrained(model_path), "architectures", None) or ())


def _streaming_defaults(sa, architectures=()) -> None:
    """Refuse what the policy cannot serve, naming the flag; set what it needs. A flag the
    user set is honoured or refused; only a default is changed, and each change is logged."""
    forced = _explicit_backends(sa, architectures)
    kw = {f: getattr(sa, f, None) for f in (
        "page_size", "kv_cache_dtype", "speculative_algorithm",
        "enable_hierarchical_cache", "chunked_prefill_size", "context_length", "max_running_requests")}
    refused = [flag for flag, bad in (
        ("--page-size other than 1 (eviction and attention are token-granular here)",
         kw.get("page_size") not in (None, 1)),
        ("--kv-cache-dtype (quantized KV)", kw.get("kv_cache_dtype") not in (None, "auto")),
        ("--speculative-algorithm", kw.get("speculative_algorithm") is not None),
        ("--enable-hierarchical-cache", bool(kw.get("enable_hierarchical_cache"))),
        ("--chunked-prefill-size <= 0 (a long prompt streams through the window chunk by chunk)",
         kw.get("chunked_prefill_size") is not None and kw["chunked_prefill_size"] <= 0),
    ) if bad]
    if refused:
        raise PolicyConfigError(f"--kv-policy streaming-sink does not support {'; '.join(refused)}")
    radix = not getattr(sa, "disable_radix_cache", False)
    if radix:  # the radix cache stays on (SGLang's default): ours, with tombstones (radix.py)
        other = [flag for flag, bad in (
            (f"--radix-cache-backend {getattr(sa, 'radix_cache_backend', None)!r}",
             getattr(sa, "radix_cache_backend", None) not in (None, RADIX_BACKEND)),
            ("--enable-lmcache", bool(getattr(sa, "enable_lmcache", False))),
            ("--enable-flexkv", bool(getattr(sa, "enable_flexkv", False))),
            ("--enable-unified-cache-external-linker",
             bool(getattr(sa, "enable_unified_cache_external_linker", False))),
        ) if bad]
        if other:
            raise PolicyConfigError(
                f"--kv-policy streaming-sink runs the radix cache as its own backend "
                f"({RADIX_BACKEND!r}: tombstones for the recycled gap); it does not support "
                f"{'; '.join(other)}. Drop it, or add --disable-radix-cache")
    changed = []  # defaults the policy sets (a value the user gave is never here)
    if radix and getattr(sa, "radix_cache_backend", None) is None:
        changed.append(f"--radix-cache-backend {RADIX_BACKEND} (the recycled gap as tombstones)")
    if radix:
        sa.radix_cache_backend = RADIX_BACKEND
    if kw["page_size"] is None:
        sa.page_size = 1
        changed.append("--page-size 1 (eviction is token-granular)")
    if not getattr(sa, "disable_overlap_schedule", False):
        sa.disable_overlap_schedule = True  # frees happen between steps, never under a running batch
        changed.append("--disable-overlap-schedule (frees happen between steps)")
    if not getattr(sa, "disable_hybrid_swa_memory", False):
        sa.disable_hybrid_swa_memory = True  # one pool: a layer's own window is an attention mask here
        changed.append("--disable-hybrid-swa-memory (one pool; a layer's own window is a mask)")
    if kw["context_length"] is None:
        sa.context_length = sink_config.DEFAULT_STREAM_LEN
        changed.append(f"--context-length {sa.context_length} (a whole stream; may exceed the model's)")
    if kw["max_running_requests"] is None:
        sa.max_running_requests = sink_config.DEFAULT_MAX_RUNNING_REQUESTS
        changed.append(f"--max-running-requests {sa.max_running_requests} (SGLang's token table is "
                       f"max_running_requests x context_length int32)")
    # Touch point 2: our backend (a torch_native subclass) is built whatever SGLang resolves
    # the attention backend to; the name is left alone (SGLang's GPT-OSS check reads it).
    if forced:
        attention = (f"{', '.join(forced)} as given: the model's SGLang check needs a name from "
                     f"its list; the streaming-sink backend runs instead")
    elif sa.attention_backend == BASE_ATTENTION_BACKEND:
        attention = f"--attention-backend {BASE_ATTENTION_BACKEND} as given (ours subclasses it)"
    else:
        attention = "the streaming-sink backend (a torch_native subclass) replaces SGLang's default"
    logger.info("streaming-sink: defaults changed: %s; attention: %s",
                "; ".join(changed) or "none", attention)
    # A stream may be far longer than the model's context: positions stay inside the
    # cache. SGLang refuses a longer --context-length without this; set only here.
    os.environ["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"


def _refuse_state_layers(model_path: str) -> None:
    """Linear-attention / SSM hybrids (Qwen3-Next, Falcon-H1, NemotronH, ...): SGLang keeps
    their state in a Mamba pool beside the KV pool, which the policy does not handle."""
    from transformers import AutoConfig

    from streaming_sink.hybrid import refusal, state_layers

    cfg = AutoConfig.from_pretrained(model_path)
    state = state_layers(cfg)
    if state is not None:
        raise PolicyConfigError(refusal(model_path, cfg, state))


def _refuse_long_layer_windows(model_path: str, policy: SinkPolicy) -> None:
    """A layer type with its own sliding window (Gemma 3, GPT-OSS: ``layer_types`` has
    ``sliding_attention``; HF's window = keys with ``t - k < sliding_window``) must fit
    ``--sink-window + 1`` (``SinkPolicy.check_layer_window``). The backend checks the
    built layers again (``_layer_ropes``)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    cfg = getattr(cfg, "text_config", None) or cfg
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        policy.check_layer_window(getattr(cfg, "sliding_window", None), "a sliding_attention layer")


def _rotary_table_len(model_path: str) -> int:
    """The model's rotary table (max_position_embeddings); refuses models without RoPE."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    cfg = getattr(cfg, "text_config", None) or cfg
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    # Flat ({"rope_theta": ...}) or nested per layer type (Gemma 3 under transformers 5:
    # {"full_attention": {...}, "sliding_attention": {...}}).
    tables = [params, *(v for v in params.values() if isinstance(v, dict))] if isinstance(params, dict) else []
    has_rope = getattr(cfg, "rope_theta", None) is not None or any(
        "rope_theta" in t or "rope_type" in t for t in tables)
    if not has_rope:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink needs a RoPE model; {model_path} "
            f"({getattr(cfg, 'model_type', '?')}) has no rotary position embedding")
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)


# ---- 2: the attention backend (scheduler process) --------------------------

def _build_backend(original, *, model_runner, backend_str, init_new_workspace):
    global _active
    policy = sink_config.policy_of(model_runner.server_args)
    if policy is None:
        return original(model_runner=model_runner, backend_str=backend_str,
                        init_new_workspace=init_new_workspace)
    model_runner.init_new_workspace = init_new_workspace
    _active = policy
    backend = _backend_class()(model_runner, policy)
    logger.info("streaming-sink: %s; %d attention layers use positions inside the cache",
                policy.describe(), len(backend.ropes))
    return backend


def _backend_class():
    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from streaming_sink.cpu_attention import query_rows

    from .attention import query_start_loc, token_pool_attention

    class StreamingSinkAttnBackend(TorchNativeAttnBackend):
        """torch_native's KV writes; per step, requests whose every query is below the
        window (dense: keys at their natural positions) run torch_native's own SDPA
        loop, the others the core's streaming kernel. Learned sinks (GPT-OSS), which
        torch_native cannot compute, always take the core."""

        def __init__(self, model_runner, policy: SinkPolicy):
            super().__init__(model_runner)
            self.policy = policy
            self.ropes = _layer_ropes(model_runner.model, policy)
            self.split = self.qsl = None
            if model_runner.device == "cpu":
                from streaming_sink.cpu_attention import load

                load()  # built once per machine, at startup rather than on the first request

        def init_forward_metadata(self, forward_batch):
            """Once per step: the requests' query offsets, which requests are dense, their rows."""
            super().init_forward_metadata(forward_batch)
            fb = forward_batch
            self.split = self.qsl = None  # split: (dense mask or None = all, their rows, streaming ids)
            if fb.seq_lens is None or fb.forward_mode.is_idle():
                return
            q_lens = fb.extend_seq_lens if fb.forward_mode.is_extend() else torch.ones_like(fb.seq_lens)
            self.qsl = query_start_loc(q_lens)
            if fb.seq_lens.is_cuda:
                return
            dense = fb.seq_lens <= self.policy.dense_tokens
            if not bool(dense.any()):
                return
            if bool(dense.all()):
                self.split = (None, None, None)
                return
            rows, _ = query_rows(self.qsl, torch.nonzero(dense).flatten())
            self.split = (dense, rows, torch.nonzero(~dense).flatten())

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
            streaming = None
            if sinks is None and self.split is not None:  # torch_native has no learned sinks
                dense, rows, streaming = self.split
                self._stock_rows(q_, o, layer, fb, extend, sw, dense, rows)
                if streaming is None:
                    return o.view(n, -1)
            token_pool_attention(
                q_, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id), self.req_to_token_pool.req_to_token,
                fb.req_pool_indices, fb.seq_lens, self.qsl, layer.scaling, self.policy,
                self.ropes[layer.layer_id], o, sinks=sinks,
                sliding_window=sw + 1 if sw is not None else None, seq_ids=streaming)
            return o.view(n, -1)

        def _stock_rows(self, q_, o, layer, fb, extend, sw, dense, rows):
            """torch_native's own per-request SDPA loop for the dense requests (mask
            ``dense``, query ``rows``; None: every request), called as stock SGLang calls it."""
            reqs = dict(req_pool_indices=fb.req_pool_indices, seq_lens=fb.seq_lens)
            if extend:
                reqs.update(extend_prefix_lens=fb.extend_prefix_lens, extend_seq_lens=fb.extend_seq_lens)
            q_sub, o_sub = q_, o
            if dense is not None:
                reqs = {key: val[dense] for key, val in reqs.items()}
                q_sub = q_[rows]
                o_sub = torch.empty_like(q_sub)
            run = self._run_sdpa_forward_extend if extend else self._run_sdpa_forward_decode
            run(q_sub, o_sub, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id), self.req_to_token_pool.req_to_token,
                **reqs, encoder_lens=None, scaling=layer.scaling,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num, causal=extend,
                is_cross_attn=False, sliding_window_size=sw)
            if dense is not None:
                o[rows] = o_sub

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
            return self._run(q, k, v, layer, forward_batch, save_kv_cache, True, **kw)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kw):
            return self._run(q, k, v, layer, forward_batch, save_kv_cache, False, **kw)

    return StreamingSinkAttnBackend


def _layer_ropes(model, policy: SinkPolicy) -> dict:
    """Each RadixAttention layer's rotary frequencies, from the ``rotary_emb`` beside it
    (Gemma 3: one per layer type, its own base); refuses a layer window past W + 1."""
    from sglang.srt.layers.radix_attention import RadixAttention

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


# ---- 3: positions inside the cache ------------------------------------------

def _remap_positions(result, cls, batch, *args, **kwargs):
    # _active: set when this process built its attention backend, before any forward.
    if _active is not None and result.positions is not None:
        result.positions = _active.cache_position(result.positions)
    return result


# ---- 4 + 5: eviction through SGLang's allocator ------------------------------

def _evict(original, batch):
    original(batch)
    if _active is None:
        return
    allocator = batch.token_to_kv_pool_allocator
    rows = batch.req_to_token_pool.req_to_token
    extend = batch.forward_mode.is_extend()
    trace, recycled = {}, 0
    for idx, req in enumerate(batch.reqs):
        kv = req.kv
        if not kv.holds_kv:
            continue
        # Tokens whose KV is in the cache before this step's allocation.
        done = int(batch.prefix_lens[idx]) if extend else req.seqlen - 1
        done = min(done, kv.kv_committed_len)
        entry = _cursors.get(id(kv))
        if entry is None or entry[0] is not kv:
            if entry is not None and _metrics is not None:
                _metrics.release(entry[1], observe=False)  # a stale entry (its id reused)
            # A resumed request owns its row from the tree's prefix on: [0, h) is shared.
            entry = _cursors[id(kv)] = (kv, EvictionCursor(_active, kv.cache_protected_len))
        cursor = entry[1]
        # Held since the previous step's allocation, before this step's free.
        cursor.peak = max(cursor.peak, cursor.held(kv.kv_allocated_len))
        span = cursor.advance(_active, done)
        if span is not None:
            allocator.free(rows[kv.req_pool_idx, span[0]:span[1]])
            recycled += span[1] - span[0]
        if _metrics is not None:
            _metrics.update(cursor, done)
        trace[req.rid] = cursor.held(kv.kv_allocated_len)
    if _metrics is not None:
        _metrics.recycled(recycled)
    _trace(allocator, getattr(batch, "tree_cache", None), step=trace)


def _free_kv_row(original, cache, kv, ranges):
    entry = _cursors.pop(id(kv), None)
    if entry is not None and entry[0] is kv:
        ranges = entry[1].live_ranges(ranges)
        if _metrics is not None:  # the first release call of a request: its final row length
            cursor = entry[1]
            cursor.peak = max(cursor.peak, cursor.held(kv.kv_allocated_len))
            _metrics.release(cursor)
    elif entry is not None and _metrics is not None:
        _metrics.release(entry[1], observe=False)
    return original(cache, kv, ranges)


def freed_range(kv) -> tuple[int, int]:
    """Row positions ``[lo, hi)`` of ``kv`` the policy already gave back (radix.py
    inserts them as tombstones)."""
    entry = _cursors.get(id(kv))
    if entry is None or entry[0] is not kv:
        return 0, 0
    return entry[1].start, entry[1].freed_to


def _trace(allocator, tree=None, **record) -> None:
    """One JSON line per step (before its allocation): slots each request holds of its
    own, live slots the radix tree holds (``tree``: shared, locked or evictable) and
    slots in use in SGLang's allocator. Frees inside SGLang's free groups land at the
    group's end, so an idle engine's next step shows what came back."""
    path = os.environ.get(TRACE_ENV)
    if path:
        record["used"] = allocator.size - allocator.available_size()
        record["tree"] = (tree.evictable_size() + tree.protected_size()) if tree is not None else 0
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---- 9: metrics in SGLang's /metrics (scheduler process) --------------------

def _metrics_collector(ctx, cls, *args, server_args=None, **kwargs):
    """After SGLang built its scheduler metrics: ours, with its labels and metric classes,
    where it publishes its own (one series per scheduler rank that does)."""
    global _metrics
    policy = sink_config.policy_of(server_args) if server_args is not None else None
    collector = getattr(ctx, "collector", None)
    if policy is None or collector is None or not ctx.current_scheduler_metrics_enabled:
        return ctx
    _metrics = SinkMetrics(policy, collector.labels, server_args.chunked_prefill_size or 1,
                           type(collector)._gauge_cls, type(collector)._counter_cls,
                           type(collector)._histogram_cls)
    logger.info("streaming-sink: Prometheus metrics %s* on", "sglang:streaming_sink_")
    return ctx


# ---- 8: the radix cache (scheduler process) ---------------------------------

def _radix_cache(ctx):
    """``--radix-cache-backend streaming-sink`` (set by apply_flags when the radix
    cache is on): SGLang's ``RadixCache`` with the recycled gap as tombstones."""
    from .radix import make_cache_class

    policy = sink_config.policy_of(ctx.server_args)
    if policy is None:
        raise PolicyConfigError(f"--radix-cache-backend {RADIX_BACKEND} needs --kv-policy streaming-sink")
    return make_cache_class()(ctx.params, policy, freed_range)


# ---- 6: a request's KV demand is its live bound ------------------------------

def _demand_cap(chunk: int | None = None) -> int:
    return _active.max_live_blocks(max(chunk or 1, 1)) * _active.block_size


def _max_new_tokens_for_memory(original, allocator, input_tokens, max_new_tokens, **kwargs):
    if _active is None:
        return original(allocator, input_tokens, max_new_tokens, **kwargs)
    return max_new_tokens  # the stream never holds more than its window


def _check_prefill(original, budget, **kwargs):
    if _active is not None:
        cap = _demand_cap(kwargs.get("chunk_limit"))
        kwargs["total_tokens"] = min(kwargs["total_tokens"], cap)
    return original(budget, **kwargs)


def _add_one_req(original, adder, req, *args, **kwargs):
    if _active is None or not req.sampling_params.ignore_eos:
        return original(adder, req, *args, **kwargs)
    req.sampling_params.ignore_eos = False  # read only to pick the admission path
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        req.sampling_params.ignore_eos = True


def _running_offset(original, adder, req):
    offset = original(adder, req)
    return offset if _active is None else min(offset, _demand_cap())


def _reserve(original, budget, extend_input_len, max_new_tokens, **kwargs):
    if _active is not None:
        max_new_tokens = min(max_new_tokens, _demand_cap())
    return original(budget, extend_input_len, max_new_tokens, **kwargs)


def _worker_info(info, worker):
    """(..., max_req_len, max_req_input_len, ...) at positions 4 and 5."""
    if sink_config.policy_of(worker.model_runner.server_args) is None:
        return info
    context = worker.model_config.context_len
    return (*info[:4], context - 1, context - 6, *info[6:])
