"""Touch point 8: what an operator meets.

``ServeSubcommand.cmd``: a policy refusal in one line (exit 2), not a traceback;
``ModelConfig.get_diff_sampling_param``: a request without max_tokens gets the model's context;
``EngineCore._initialize_kv_caches`` + ``_check_enough_kv_cache_memory``: the policy's advice
for a KV cache too small for one request (not vLLM's "decrease max_model_len").
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging

from streaming_sink.policy import PolicyConfigError

from .. import config as sink_config

logger = logging.getLogger("vllm.streaming_sink")


def install_cli_refusal() -> None:
    """``vllm serve`` with a setting the policy refuses (our ``PolicyConfigError``, raised
    in this process while the config is built): one line naming the flag and exit 2, as
    argparse does for a bad argument, instead of a traceback through vLLM's config code.
    Every other error keeps vLLM's traceback; ours is logged at VLLM_LOGGING_LEVEL=DEBUG."""
    import sys

    serve = sys.modules.get("vllm.entrypoints.cli.serve")
    command = getattr(serve, "ServeSubcommand", None)
    if command is None or getattr(getattr(vars(command).get("cmd"), "__func__", None), "_streaming_sink", False):
        return  # not the `vllm` CLI (LLM(...), engine and worker processes), or done
    original = vars(command)["cmd"].__func__

    @functools.wraps(original)
    def cmd(args):
        try:
            return original(args)
        except PolicyConfigError as e:
            logger.debug("streaming-sink: refused", exc_info=True)
            print(f"vllm serve: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    cmd._streaming_sink = True
    command.cmd = staticmethod(cmd)


DEFAULT_MAX_TOKENS_ATTR = "_streaming_sink_default_max_tokens"


def set_default_max_tokens(model_config, usage_context) -> None:
    """A request without max_tokens gets at most the model's own context of new tokens,
    as without the policy (stock: ``max_model_len - prompt``, max_model_len being that
    context). Under the policy max_model_len is a stream's length (131072 by default):
    a client that forgets max_tokens must not hold a slot for that long. Served the way
    vLLM serves a model's generation_config.json ``max_new_tokens`` (a default, not a
    cap: ``get_diff_sampling_param``, read by the OpenAI server); the user's
    ``--override-generation-config '{"max_new_tokens": N}'`` wins. Not for ``LLM(...)``,
    whose own default (16) is already smaller, nor with ``--generation-config <folder>``,
    where vLLM turns that default into a cap for every request (logged)."""
    if usage_context == "LLM_CLASS":
        return
    override = (model_config.override_generation_config or {}).get("max_new_tokens")
    if override is not None:
        logger.info("streaming-sink: a request without max_tokens gets at most %s new tokens "
                    "(--override-generation-config max_new_tokens, also every request's cap)", override)
        return
    if model_config.generation_config not in ("auto", "vllm"):
        logger.warning("streaming-sink: with --generation-config %s a request without max_tokens "
                       "gets that folder's max_new_tokens or, without one, up to max_model_len "
                       "(%d) new tokens", model_config.generation_config, model_config.max_model_len)
        return
    context = _model_context(model_config)
    setattr(model_config, DEFAULT_MAX_TOKENS_ATTR, context)
    logger.info("streaming-sink: a request without max_tokens gets at most %d new tokens (the "
                "model's context, as without the policy); longer streams: max_tokens per request, "
                "or --override-generation-config '{\"max_new_tokens\": N}' per server (N also caps "
                "every request)", context)


def _model_context(model_config) -> int:
    """The max_model_len vLLM derives from the model when none is given (its own rule:
    ``get_and_verify_max_len(None)``), without its "Using max model len" line again."""
    model_log = logging.getLogger("vllm.config.model")
    level = model_log.level
    model_log.setLevel(logging.WARNING)
    try:
        return int(model_config.get_and_verify_max_len(None))
    finally:
        model_log.setLevel(level)


# The engine config whose KV cache EngineCore is sizing, when the policy is on.
_kv_check_config: contextvars.ContextVar = contextvars.ContextVar("streaming_sink_kv_check", default=None)


def kv_check_module() -> str:
    """Where vLLM's KV-size check lives: kv_cache_planning (0.33), kv_cache_utils (0.32)."""
    import importlib.util

    planning = "vllm.v1.core.kv_cache_planning"
    return planning if importlib.util.find_spec(planning) else "vllm.v1.core.kv_cache_utils"


def install() -> None:
    from vllm.config import ModelConfig
    from vllm.v1.engine.core import EngineCore

    kv_check = importlib.import_module(kv_check_module())

    original_params = ModelConfig.get_diff_sampling_param

    @functools.wraps(original_params)
    def get_diff_sampling_param(self):
        params = original_params(self)
        default = getattr(self, DEFAULT_MAX_TOKENS_ATTR, None)
        if default is not None:  # a generation_config.json max_new_tokens below it stays
            params = {**params, "max_tokens": min(params.get("max_tokens", default), default)}
        return params

    ModelConfig.get_diff_sampling_param = get_diff_sampling_param

    original_init = vars(EngineCore)["_initialize_kv_caches"]

    @functools.wraps(original_init)
    def _initialize_kv_caches(self, vllm_config, *args, **kwargs):
        token = _kv_check_config.set(vllm_config if sink_config.policy_of(vllm_config) else None)
        try:
            return original_init(self, vllm_config, *args, **kwargs)
        finally:
            _kv_check_config.reset(token)

    EngineCore._initialize_kv_caches = _initialize_kv_caches

    original_check = kv_check._check_enough_kv_cache_memory

    @functools.wraps(original_check)
    def _check_enough_kv_cache_memory(available_memory, get_needed_memory, max_model_len,
                                      estimate_max_model_len):
        # vLLM's own message advises a smaller max_model_len, which under the policy
        # would cap every stream and frees nothing: a request's blocks do not grow with it.
        vllm_config = _kv_check_config.get()
        if vllm_config is not None and available_memory > 0:
            needed = get_needed_memory()
            if needed > available_memory:
                raise ValueError(kv_space_advice(vllm_config, needed, available_memory))
        return original_check(available_memory, get_needed_memory, max_model_len, estimate_max_model_len)

    kv_check._check_enough_kv_cache_memory = _check_enough_kv_cache_memory


def kv_space_advice(vllm_config, needed: int, available: int) -> str:
    """Why one request does not fit the KV cache under the policy, and what to change."""
    from vllm.platforms import current_platform

    policy = sink_config.policy_of(vllm_config)
    in_flight = vllm_config.max_in_flight_tokens
    fixed = policy.max_live_blocks(1)  # Sb + Wb + 1
    per_request = policy.max_live_blocks(in_flight)
    gib = 1 << 30
    space = ("VLLM_CPU_KVCACHE_SPACE (GiB of KV cache)" if current_platform.is_cpu()
             else "--gpu-memory-utilization")
    if vllm_config.cache_config.num_gpu_blocks_override is not None:
        space += f", or a larger --num-gpu-blocks-override (now {vllm_config.cache_config.num_gpu_blocks_override})"
    return (
        f"streaming-sink: the KV cache ({available / gib:.3f} GiB) cannot hold one request under "
        f"--kv-policy streaming-sink, which needs {needed / gib:.3f} GiB: a request of any length "
        f"holds Sb + Wb + 1 = {policy.sink_blocks} sink + {policy.window_blocks} window + 1 current "
        f"= {fixed} blocks, plus {per_request - fixed} for the {in_flight} tokens a step may prefill "
        f"(--max-num-batched-tokens {vllm_config.scheduler_config.max_num_batched_tokens}): "
        f"{per_request} blocks of {policy.block_size} tokens per attention layer group. "
        f"max_model_len ({vllm_config.model_config.max_model_len}) does not change this; leave it. "
        f"Give the KV cache more space ({space}), or need fewer blocks: a shorter --sink-window "
        f"(now {policy.window_tokens} tokens) or a smaller --max-num-batched-tokens (the prefill chunk).")
