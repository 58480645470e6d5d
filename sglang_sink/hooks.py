"""Every touch of SGLang internals: which SGLang names we patch, and where our side lives.

Checked against sglang 0.5.23 (tested here, CPU). Any other version: the flags still
parse, and ``--kv-policy streaming-sink`` refuses to start, saying so. Hooks go through
SGLang's own ``HookRegistry`` (AROUND/AFTER), applied by ``load_plugins()`` in every
SGLang process (server/Engine, scheduler, detokenizer); startup refuses if one failed to
apply (the registry itself only logs it). Every SGLang name our code patches, calls,
subclasses or reads is in ``hook_targets()``, checked against the installed SGLang by
tests/sglang/test_sglang_hook_targets.py. The touch points (docs/sglang.md has the table):

1. ``ServerArgs.add_cli_args`` / ``from_cli_args`` and ``Engine.server_args_class``
   (flags.py): the flags on the launcher and as ``sglang.Engine`` keywords; refusals
   and changed defaults at startup; the policy rides on ServerArgs (config.py).
2. ``_build_full_attention_backend_from_str`` (backend.py): our ``TorchNativeAttnBackend``
   subclass when the policy is on.
3. ``ForwardBatch.init_new`` (backend.py): positions become cache positions ``pos(t)``.
4. ``ScheduleBatch.maybe_evict_swa`` (eviction.py): before each allocation, the slots the
   window left go back to SGLang's allocator, floor at the sinks.
5. ``BasePrefixCache.free_kv_row`` (eviction.py): the final release skips slots already freed.
6. ``BaseTokenToKVPoolAllocator.max_new_tokens_for_memory``, ``PrefillBudget.check_prefill``
   / ``.reserve``, ``PrefillAdder.add_one_req`` / ``._get_running_request_total_token_offset``
   (admission.py): a request's KV demand is its live bound, not its length.
7. ``Scheduler.init_model_worker`` (admission.py): the longest request is
   ``--context-length``, not the KV pool's size; ``Scheduler.init_req_max_new_tokens``: a
   request without max_new_tokens gets at most the model's own context, as without the policy.
8. ``mem_cache.registry.register_radix_cache_backend`` (public; radix_cache.py): our radix
   cache, ``--radix-cache-backend streaming-sink``, a ``RadixCache`` subclass.
9. ``SchedulerMetricsCollector.init_new`` (metrics.py): with ``--enable-metrics``, the
   policy's Prometheus series next to SGLang's scheduler metrics.
10. ``TokenizerManager._create_tokenized_object`` and
    ``OpenAIServingChat._convert_to_internal_request`` (frontend.py): per-request sinks,
    ``custom_params["sink_tokens"]`` checked (400 naming the field), folded into the radix
    ``extra_key``; with ``--sink-tokens system`` a chat request's system turn as its sinks.
"""

from __future__ import annotations

import importlib
import logging

from streaming_sink import versions
from streaming_sink.errors import PolicyConfigError

from .state import state

logger = logging.getLogger("sglang.streaming_sink")

CHECKED_SGLANG_VERSIONS = versions.CHECKED_VERSIONS["sglang"]  # the core's table (streaming_sink/versions.py)
RADIX_BACKEND = "streaming-sink"  # our radix cache's name in SGLang's registry (touch point 8)

_S = "sglang.srt."
# SGLang target -> (touch point, hook type, our function as "module:name" in sglang_sink)
TARGETS = {
    _S + "server_args.ServerArgs.add_cli_args": (1, "AROUND", "flags:add_cli_args"),
    _S + "server_args.ServerArgs.from_cli_args": (1, "AROUND", "flags:from_cli_args"),
    _S + "model_executor.model_runner_components.attention_backend_setup._build_full_attention_backend_from_str":
        (2, "AROUND", "backend:build_backend"),
    _S + "model_executor.forward_batch_info.ForwardBatch.init_new": (3, "AFTER", "backend:remap_positions"),
    _S + "managers.schedule_batch.ScheduleBatch.maybe_evict_swa": (4, "AROUND", "eviction:evict"),
    _S + "mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row": (5, "AROUND", "eviction:free_kv_row"),
    _S + "mem_cache.allocator.base.BaseTokenToKVPoolAllocator.max_new_tokens_for_memory":
        (6, "AROUND", "admission:max_new_tokens_for_memory"),
    _S + "mem_cache.prefill_budget.PrefillBudget.check_prefill": (6, "AROUND", "admission:check_prefill"),
    _S + "mem_cache.prefill_budget.PrefillBudget.reserve": (6, "AROUND", "admission:reserve"),
    _S + "managers.schedule_policy.PrefillAdder.add_one_req": (6, "AROUND", "admission:add_one_req"),
    _S + "managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset":
        (6, "AROUND", "admission:running_offset"),
    _S + "managers.scheduler.Scheduler.init_model_worker": (7, "AFTER", "admission:request_limits"),
    _S + "managers.scheduler.Scheduler.init_req_max_new_tokens": (7, "AROUND", "admission:default_max_new_tokens"),
    _S + "observability.metrics_collector.SchedulerMetricsCollector.init_new":
        (9, "AFTER", "metrics:on_metrics_collector"),
    _S + "managers.tokenizer_manager.TokenizerManager._create_tokenized_object":
        (10, "AROUND", "frontend:tokenized_request"),
    _S + "entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request":
        (10, "AROUND", "frontend:chat_request"),
}
FLAG_TARGETS = [t for t, (point, _, _) in TARGETS.items() if point == 1]


def sglang_version() -> str:
    import sglang

    return versions.release(sglang.__version__)


def check_version() -> None:
    versions.check_version("sglang", sglang_version())


def _ours(ref: str):
    """Our hook function ``module:name``, imported on its first call: backend.py and
    radix_cache.py import SGLang's model code, which only a scheduler needs."""
    module, _, name = ref.partition(":")

    def hook(*args, **kwargs):
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(*args, **kwargs)

    hook.__qualname__ = hook.__name__ = f"{module}.{name}"
    return hook


def _radix_cache(ctx):
    from .radix_cache import make_radix_cache

    return make_radix_cache(ctx)


def install() -> None:
    """Registers the hooks (``load_plugins()`` applies them right after)."""
    if state.installed:
        return
    state.installed = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    checked = versions.is_checked("sglang", sglang_version())
    if not checked:
        logger.warning(versions.unchecked_warning("sglang", sglang_version()))
    for target, (_, kind, ref) in TARGETS.items():
        if checked or target in FLAG_TARGETS:  # other versions: flags only, which refuse
            HookRegistry.register(target, _ours(ref), HookType[kind])
    if checked:  # 8: SGLang's public registry of radix caches
        from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

        if get_radix_cache_factory(RADIX_BACKEND) is None:
            register_radix_cache_backend(RADIX_BACKEND, _radix_cache)
    # 1: not through HookRegistry, which would also rebind every module's ``ServerArgs``
    # name to our function. A plain function attribute: Engine calls it as a method.
    from sglang.srt.entrypoints.engine import Engine

    from .flags import engine_server_args

    Engine.server_args_class = engine_server_args


def check_hooks_applied() -> None:
    """HookRegistry logs and skips a target it cannot patch; we refuse to start instead.
    Also every class, function and method of ``hook_targets()`` must exist."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [t for t in TARGETS if t not in HookRegistry._patched]
    for kind, target, _ in hook_targets():
        if kind != "attr":  # attributes may be set per instance; the tests check those
            try:
                _resolve(target)
            except (ImportError, AttributeError):
                missing.append(target)
    if missing:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink: SGLang {sglang_version()} lacks {', '.join(missing)}")


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def hook_targets() -> list[tuple[str, str, tuple[str, ...] | None]]:
    """Every SGLang name this package patches, calls, subclasses or reads, as
    ``(kind, "module:Qual.name", params)``; checked against the installed SGLang, without
    a GPU, by tests/sglang/test_sglang_hook_targets.py. Kinds (as vllm_sink.hooks.hook_targets):

    * ``hooked``: patched through HookRegistry (``TARGETS``): its parameters (``self``/``cls``
      left out) are exactly ``params``, the arguments our hook receives;
    * ``override``: our class overrides it, so SGLang calls ours the same way: its
      parameters are exactly ``params``;
    * ``call``: we call it: its leading parameters are named ``params`` (those ending in
      ``=`` passed by keyword), and the call binds;
    * ``attr``: exists (attribute, dataclass/msgspec field, property, or ``self.<name>``
      assigned in the class or an SGLang base).
    """
    s = "sglang.srt."
    tn, ra = f"{s}layers.attention.torch_native_backend:TorchNativeAttnBackend", f"{s}layers.radix_attention:RadixAttention"
    rc, bpc = f"{s}mem_cache.radix_cache:RadixCache", f"{s}mem_cache.base_prefix_cache"
    fb, sb = f"{s}model_executor.forward_batch_info:ForwardBatch", f"{s}managers.schedule_batch"
    rope = f"{s}layers.rotary_embedding.base:RotaryEmbedding"
    hooked = {
        "server_args.ServerArgs.add_cli_args": ("parser",),
        "server_args.ServerArgs.from_cli_args": ("args",),
        "model_executor.model_runner_components.attention_backend_setup._build_full_attention_backend_from_str":
            ("model_runner", "backend_str", "init_new_workspace"),
        "model_executor.forward_batch_info.ForwardBatch.init_new": (
            "batch", "model_runner", "capture_hidden_mode", "return_hidden_states_before_norm",
            "extend_position_info", "spec_mrope_positions", "kv_loc_plan", "write_cols"),
        "managers.schedule_batch.ScheduleBatch.maybe_evict_swa": (),
        "mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row": ("kv", "ranges"),
        "mem_cache.allocator.base.BaseTokenToKVPoolAllocator.max_new_tokens_for_memory": (
            "input_tokens", "max_new_tokens", "token_capacity", "sliding_window_size", "chunk_size"),
        "mem_cache.prefill_budget.PrefillBudget.check_prefill": (
            "extend_input_len", "total_tokens", "max_new_tokens", "input_tokens", "swa_host_hit_length",
            "chunk_limit", "auxiliary_swa_host_hit_length"),
        "mem_cache.prefill_budget.PrefillBudget.reserve": (
            "extend_input_len", "max_new_tokens", "extra_tokens", "chunk_limit", "is_chunked_continuation"),
        "managers.schedule_policy.PrefillAdder.add_one_req": ("req", "has_chunked_req", "truncation_align_size"),
        "managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset": ("req",),
        "managers.scheduler.Scheduler.init_model_worker": (),
        "managers.scheduler.Scheduler.init_req_max_new_tokens": ("req",),
        "observability.metrics_collector.SchedulerMetricsCollector.init_new": (
            "server_args", "enable_priority_scheduling", "enable_lora", "enable_hierarchical_cache"),
        "managers.tokenizer_manager.TokenizerManager._create_tokenized_object": (
            "obj", "input_text", "input_ids", "input_embeds", "mm_inputs", "token_type_ids"),
        "entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request": (
            "request", "raw_request"),
    }
    assert {s + t for t in hooked} == set(TARGETS), "hook_targets() and TARGETS disagree"
    targets = [("hooked", ":".join(_split_dotted(s + t)), params) for t, params in hooked.items()]
    targets += [
        # 1: flags (flags.py); ServerArgs is a msgspec Struct: fields, read before SGLang resolves them
        ("attr", f"{s}entrypoints.engine:Engine.server_args_class", None),
        *(("attr", f"{s}server_args:ServerArgs.{name}", None) for name in (
            "model_path", "page_size", "kv_cache_dtype", "speculative_algorithm", "enable_hierarchical_cache",
            "chunked_prefill_size", "context_length", "max_running_requests", "attention_backend",
            "prefill_attention_backend", "decode_attention_backend", "disable_radix_cache",
            "radix_cache_backend", "enable_lmcache", "enable_flexkv", "enable_unified_cache_external_linker",
            "disable_overlap_schedule", "disable_hybrid_swa_memory")),
        ("attr", f"{s}plugins.hook_registry:HookRegistry._patched", None),
        ("call", f"{s}plugins.hook_registry:HookRegistry.register", ("target", "hook", "hook_type")),
        # 2: the backend (backend.py) over torch_native
        ("call", f"{tn}.__init__", ("model_runner",)),  # we build ours (policy too)
        ("override", f"{tn}.init_forward_metadata", ("forward_batch",)),
        ("override", f"{tn}.forward_extend", ("q", "k", "v", "layer", "forward_batch", "save_kv_cache")),
        ("override", f"{tn}.forward_decode", ("q", "k", "v", "layer", "forward_batch", "save_kv_cache")),
        ("call", f"{tn}._run_sdpa_forward_extend", (
            "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices=", "seq_lens=",
            "extend_prefix_lens=", "extend_seq_lens=", "encoder_lens=", "scaling=", "enable_gqa=", "causal=",
            "is_cross_attn=", "sliding_window_size=")),
        ("call", f"{tn}._run_sdpa_forward_decode", (
            "query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices=", "seq_lens=",
            "encoder_lens=", "scaling=", "enable_gqa=", "causal=", "is_cross_attn=", "sliding_window_size=")),
        *(("attr", f"{tn}.{name}", None) for name in ("token_to_kv_pool", "req_to_token_pool", "swa_out_cache_loc")),
        ("call", f"{s}mem_cache.memory_pool:KVWriteLoc", ("loc", "swa_loc")),
        ("call", f"{s}mem_cache.memory_pool:MHATokenToKVPool.set_kv_buffer",
         ("layer", "loc_info", "cache_k", "cache_v")),
        ("call", f"{s}mem_cache.memory_pool:MHATokenToKVPool.get_key_buffer", ("layer_id",)),
        ("call", f"{s}mem_cache.memory_pool:MHATokenToKVPool.get_value_buffer", ("layer_id",)),
        *(("attr", f"{ra}.{name}", None) for name in (
            "layer_id", "qk_head_dim", "v_head_dim", "tp_q_head_num", "tp_k_head_num", "scaling",
            "sliding_window_size", "is_cross_attention")),
        *(("attr", f"{fb}.{name}", None) for name in (
            "seq_lens", "forward_mode", "extend_seq_lens", "extend_prefix_lens", "req_pool_indices",
            "out_cache_loc", "positions")),
        ("call", f"{s}model_executor.forward_batch_info:ForwardMode.is_idle", ()),
        ("call", f"{s}model_executor.forward_batch_info:ForwardMode.is_extend", ()),
        ("call", f"{rope}._compute_cos_sin_cache", ()),
        *(("attr", f"{rope}.{name}", None) for name in ("rotary_dim", "is_neox_style", "cos_sin_cache")),
        ("attr", f"{s}model_executor.model_runner:ModelRunner.init_new_workspace", None),
        # 4 + 5: eviction (eviction.py), trace (trace.py)
        *(("attr", f"{sb}:ScheduleBatch.{name}", None) for name in (
            "reqs", "token_to_kv_pool_allocator", "req_to_token_pool", "forward_mode", "prefix_lens", "tree_cache")),
        *(("attr", f"{sb}:Req.{name}", None) for name in ("kv", "rid", "seqlen", "sampling_params", "lock",
                                                          "last_node", "extra_key", "cache_salt", "priority",
                                                          "full_untruncated_fill_ids")),
        ("call", f"{sb}:Req.finished", ()),
        *(("attr", f"{sb}:ReqKvInfo.{name}", None) for name in (
            "holds_kv", "req_pool_idx", "kv_allocated_len", "kv_committed_len", "cache_protected_len",
            "cache_inserted_len")),
        ("call", f"{s}mem_cache.allocator.base:BaseTokenToKVPoolAllocator.free", ("free_index",)),
        ("call", f"{s}mem_cache.allocator.base:BaseTokenToKVPoolAllocator.available_size", ()),
        ("attr", f"{s}mem_cache.allocator.base:BaseTokenToKVPoolAllocator.size", None),
        ("attr", f"{s}sampling.sampling_params:SamplingParams.ignore_eos", None),
        # 7: request limits (admission.py)
        *(("attr", f"{s}managers.scheduler:Scheduler.{name}", None) for name in (
            "server_args", "model_config", "max_req_len", "max_req_input_len")),
        ("attr", f"{s}configs.model_config:ModelConfig.context_len", None),
        ("attr", f"{s}configs.model_config:ModelConfig.hf_text_config", None),
        ("call", f"{s}utils.hf_transformers_utils:get_context_length", ("config",)),
        ("attr", f"{s}sampling.sampling_params:SamplingParams.max_new_tokens", None),
        # 8: the radix cache (radix_cache.py)
        ("call", f"{s}mem_cache.registry:register_radix_cache_backend", ("name", "factory")),
        ("call", f"{s}mem_cache.registry:get_radix_cache_factory", ("name",)),
        ("call", f"{rc}.__init__", ("params",)),  # we build ours (policy too)
        *(("override", f"{rc}.{name}", ()) for name in (
            "reset", "evictable_size", "protected_size", "_total_size_helper")),
        *(("override", f"{bpc}:BasePrefixCache.{name}", ()) for name in ("full_evictable_size", "full_protected_size")),
        ("override", f"{rc}.inc_lock_ref", ("node",)),
        ("override", f"{rc}.dec_lock_ref", ("node", "params")),
        ("override", f"{rc}._insert_helper", ("node", "key", "value", "priority", "inserted_len")),
        ("override", f"{rc}._delete_leaf", ("node",)),
        ("override", f"{rc}.evict", ("params",)),
        ("override", f"{rc}.match_prefix", ("params",)),
        ("override", f"{rc}.checkpoint", ("req", "up_to")),
        ("call", f"{rc}._match_prefix_helper", ("node", "key")),
        ("call", f"{rc}._split_node", ("key", "child", "split_len")),
        ("call", f"{rc}.insert", ("params",)),
        ("call", f"{bpc}:BasePrefixCache.lock", ("node",)),
        ("call", f"{bpc}:BasePrefixCache.unlock", ("lock",)),
        *(("attr", f"{rc}.{name}", None) for name in (
            "disable", "root_node", "evictable_size_", "evictable_leaves", "eviction_strategy", "kv_events",
            "req_to_token_pool", "token_to_kv_pool_allocator", "_empty_match_result")),
        *(("attr", f"{s}mem_cache.radix_cache:TreeNode.{name}", None) for name in (
            "value", "parent", "children", "lock_ref")),
        ("call", f"{s}mem_cache.radix_cache:RadixKey", ("token_ids", "extra_key", "cache_salt=")),
        ("call", f"{bpc}:InsertParams", ("key=", "value=", "inserted_len=", "priority=")),
        ("call", f"{bpc}:MatchResult", ("device_prefix_len=", "last_device_node=", "last_host_node=",
                                        "best_match_node=")),
        ("call", f"{bpc}:EvictResult", ("num_tokens_evicted=",)),
        ("call", f"{bpc}:IncLockRefResult", ("delta=",)),
        ("call", f"{bpc}:DecLockRefResult", ("delta=",)),
        *(("attr", f"{bpc}:{name}", None) for name in (
            "MatchPrefixParams.key", "EvictParams.num_tokens", "InsertResult.prefix_len")),
        # 9: metrics (metrics.py)
        *(("attr", f"{s}observability.metrics_collector:SchedulerMetricsCollectorContext.{name}", None)
          for name in ("collector", "current_scheduler_metrics_enabled")),
        *(("attr", f"{s}observability.metrics_collector:SchedulerMetricsCollector.{name}", None)
          for name in ("labels", "_gauge_cls", "_counter_cls", "_histogram_cls")),
        # 10: per-request sinks (frontend.py; the scheduler side reads custom_params: state.py,
        # backend.remap_positions, radix_cache.match_prefix)
        ("attr", f"{s}sampling.sampling_params:SamplingParams.custom_params", None),
        *(("attr", f"{s}managers.tokenizer_manager:TokenizerManager.{name}", None)
          for name in ("server_args", "tokenizer", "model_config")),
        ("attr", f"{s}configs.model_config:ModelConfig.is_multimodal", None),
        *(("attr", f"{s}managers.io_struct:GenerateReqInput.{name}", None) for name in ("sampling_params",)),
        ("attr", f"{s}managers.io_struct:TokenizedGenerateReqInput.extra_key", None),
        ("attr", f"{s}entrypoints.openai.serving_chat:OpenAIServingChat.tokenizer_manager", None),
        ("call", f"{s}entrypoints.openai.serving_chat:OpenAIServingChat._process_messages",
         ("request", "is_multimodal")),
        ("attr", f"{s}entrypoints.openai.protocol:MessageProcessingResult.prompt_ids", None),
        *(("attr", f"{s}entrypoints.openai.protocol:ChatCompletionRequest.{name}", None) for name in (
            "messages", "custom_params", "input_ids", "continue_final_message", "_format_add_generation_prompt")),
        ("attr", f"{s}entrypoints.openai.protocol:ChatCompletionMessageGenericParam.role", None),
        ("attr", f"{bpc}:MatchPrefixParams.req", None),
        ("attr", f"{s}model_executor.forward_batch_info:ForwardBatch.extend_seq_lens", None),
    ]
    return targets


def _split_dotted(dotted: str) -> tuple[str, str]:
    """``a.b.c.Cls.meth`` -> (``a.b.c``, ``Cls.meth``): the longest importable module."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return module, ".".join(parts[i:])
    raise ImportError(dotted)
