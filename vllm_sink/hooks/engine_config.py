"""Touch points 1, 2 and 6: the policy's flags on vLLM's CLI and ``LLM(...)``, and the engine
config they shape.

``EngineArgs.add_cli_args`` / ``from_cli_args`` / ``__init__`` take ``--kv-policy --sink-tokens
--sink-window --max-sink-tokens`` (they travel in ``additional_config``);
``EngineArgs.create_engine_config`` turns chunked prefill on, allows a ``max_model_len`` past the
model's context, selects our backend (``attention_backend=CUSTOM``), resolves the policy for the
final block size and refuses what it cannot serve, naming the flag. ``ModelConfig.get_sliding_window``
(touch point 6) is read here to refuse a layer window longer than the policy's.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from streaming_sink import flags as sink_flags
from streaming_sink.flags import check_flags
from streaming_sink.hf_config import check_model_config, layer_window, rotary_table_len
from streaming_sink.policy import PolicyConfigError, SinkPolicy

from .. import config as sink_config
from .. import kv_layouts
from .attention_backend import inner_backend_choice
from .operator_facing import install_cli_refusal, set_default_max_tokens
from .version import check_version

logger = logging.getLogger("vllm.streaming_sink")

# Every vLLM default the policy changes, for `vllm serve --help=streaming-sink` (each is
# also logged when it applies); what a user sets is honoured or refused naming the flag.
CHANGED_DEFAULTS = (
    "With --kv-policy streaming-sink these vLLM defaults change: --max-model-len "
    f"{sink_config.DEFAULT_STREAM_LEN} (a request's whole stream, past the model's context); a "
    "request without max_tokens still gets at most the model's context of new tokens, as "
    "without the policy (longer streams: max_tokens per request, or per server "
    "--override-generation-config '{\"max_new_tokens\": N}', which also caps every request at "
    "N); chunked prefill on; --attention-backend CUSTOM (streaming-sink's, around the backend "
    "vLLM picks or the one you name).")


def add_flags(parser) -> None:
    # names, defaults and help: streaming_sink/flags.py
    sink_flags.add_flags(parser, "vllm", CHANGED_DEFAULTS)


def install() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    original_add = EngineArgs.add_cli_args

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_flags(parser)
        install_cli_refusal()  # `vllm serve` builds its parser here, before it reads its command
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args)

    original_from = EngineArgs.from_cli_args.__func__

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        _store_flags(engine_args, {f: getattr(args, f, None) for f in sink_flags.FLAGS})
        # Also into the namespace: with --api-server-count > 1 vLLM pickles it to API
        # server processes that run the stock from_cli_args before any plugin loads
        # (plugins load inside EngineArgs.__post_init__); --additional-config carries it.
        if sink_config.KEY in (engine_args.additional_config or {}) and hasattr(args, "additional_config"):
            args.additional_config = {**(args.additional_config or {}),
                                      sink_config.KEY: engine_args.additional_config[sink_config.KEY]}
        return engine_args

    EngineArgs.from_cli_args = classmethod(from_cli_args)

    for cls in (EngineArgs, AsyncEngineArgs):  # dataclass subclasses each have an __init__
        _wrap_init(cls)
    original_create = EngineArgs.create_engine_config

    @functools.wraps(original_create)
    def create_engine_config(self, *args, **kwargs):
        opts = sink_config.settings(self.additional_config)
        if opts is None:
            return original_create(self, *args, **kwargs)
        # Also validates settings given as additional_config={"streaming_sink": {...}}.
        opts = check_flags(**{f: opts.get(f) for f in sink_flags.FLAGS}, sink_mode=opts.get("sink_mode"))
        return _create_streaming_config(self, original_create, opts, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


def _wrap_init(cls) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, kv_policy=None, sink_tokens=None, sink_window=None, max_sink_tokens=None,
                 **kwargs):
        original(self, *args, **kwargs)
        _store_flags(self, {"kv_policy": kv_policy, "sink_tokens": sink_tokens,
                            "sink_window": sink_window, "max_sink_tokens": max_sink_tokens})

    cls.__init__ = __init__


def _store_flags(engine_args, flags: dict) -> None:
    if not sink_flags.flags_given(flags):
        return
    opts = check_flags(**flags)
    engine_args.additional_config = {**(engine_args.additional_config or {}), sink_config.KEY: opts}


def _create_streaming_config(args, original_create, opts, *a, **kw):
    check_version()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    inner = inner_backend_choice(args.attention_backend, args.attention_config)
    check_speculative(args.speculative_config)
    kv_layouts.check_kv_cache_dtype(args.kv_cache_dtype)  # plain floats and per-tensor fp8
    unsupported = [name for name, on in (
        ("KV transfer / disaggregated prefill (--kv-transfer-config)", args.kv_transfer_config),
        ("decode context parallelism", (args.decode_context_parallel_size or 1) > 1),
    ) if on]
    if unsupported:
        raise PolicyConfigError(f"--kv-policy streaming-sink does not support {', '.join(unsupported)} yet")
    _refuse_explicit_conflicts(args)
    # Only defaults change, each with a line; what the user set is honoured or refused above.
    changed = []
    if args.enable_chunked_prefill is None:
        args.enable_chunked_prefill = True
        changed.append("chunked prefill on (a long prompt streams through the window chunk by chunk)")
    changed.append(f"attention backend CUSTOM: streaming-sink's around "
                   f"{inner or 'the one vLLM picks'} (dense rows run it, streaming rows the core's kernel)")
    args.attention_backend = AttentionBackendEnum.CUSTOM
    if changed:
        logger.info("streaming-sink: engine defaults changed: %s", "; ".join(changed))
    # Prefix caching is left to vLLM and the user: a hit reuses the sink and window
    # blocks of a cached prefix (kv_manager.py); --no-enable-prefix-caching is honoured.
    if args.max_model_len is None:
        args.max_model_len = sink_config.DEFAULT_STREAM_LEN
        logger.info("streaming-sink: max_model_len %d (a request's whole stream; set "
                    "--max-model-len to change it)", args.max_model_len)
    with _allow_long_max_model_len():
        vllm_config = original_create(args, *a, **kw)

    kv_layouts.check_kv_cache_dtype(vllm_config.cache_config.cache_dtype, vllm_config.model_config.dtype)
    if vllm_config.speculative_config is not None:  # the method vLLM inferred (a draft model's type)
        check_speculative({"method": vllm_config.speculative_config.method})
    text_config = vllm_config.model_config.hf_text_config
    _refuse_state_layers(vllm_config.model_config)
    check_model_config(text_config, vllm_config.model_config.model)  # hybrids, RoPE (core rules)
    block_size = vllm_config.cache_config.block_size
    policy = SinkPolicy.resolve(
        opts["sink_tokens"], opts["sink_window"], block_size, rotary_table_len(text_config), "the model",
        max_sink_tokens=opts["max_sink_tokens"])
    # Layers with their own window (GPT-OSS, Gemma 3) keep it; refused here, before the
    # engine is built, when it reaches past the policy's window: the config's window
    # (the core's rule) and vLLM's reading of it (the layer construction checks again
    # with the per-layer value: backend.py).
    for window in (layer_window(text_config), vllm_config.model_config.get_sliding_window()):
        if isinstance(window, int):
            policy.check_layer_window(window, "the model")
    vllm_config.additional_config[sink_config.KEY] = {
        **sink_flags.resolved_settings(opts, policy), "inner_backend": inner}
    max_model_len = vllm_config.model_config.max_model_len
    logger.info("%s; max_model_len %d", policy.describe(), max_model_len)
    _explain_stock_warnings(policy, max_model_len, rotary_table_len(text_config))
    usage = kw.get("usage_context", a[0] if a else None)
    set_default_max_tokens(vllm_config.model_config, getattr(usage, "name", usage))
    return vllm_config


# Speculative methods the policy serves: their proposer keeps no KV cache of its own, so
# the target model's verification rows (1 + k queries per request) are the only attention,
# through the same split and kernels as a prefill chunk (docs/speculative-decoding.md).
SPECULATIVE_METHODS = ("ngram",)


def check_speculative(spec) -> None:
    """``--speculative-config`` (the dict vLLM's EngineArgs holds): n-gram is served;
    a drafter with attention layers of its own (draft_model, EAGLE, MTP, ...) is refused
    naming its method: its layers would get the policy's backend and KV spec but not its
    positions (the drafter runs at natural positions, its KV would not follow pos(t))."""
    if not spec:
        return
    method = spec.get("method")
    if method is None and spec.get("model") in ("ngram", "[ngram]"):
        method = "ngram"
    if method == "[ngram]":
        method = "ngram"
    if method is None:  # a draft model whose method vLLM infers: checked again once resolved
        return
    if method not in SPECULATIVE_METHODS:
        why = ("its drafter is not checked under the policy" if method in _KV_FREE_DRAFTERS else
               "its drafter has attention layers of its own, whose KV the policy does not position")
        raise PolicyConfigError(
            f"--kv-policy streaming-sink supports --speculative-config method "
            f"{' / '.join(SPECULATIVE_METHODS)} only; method {method!r}: {why}")


# Drafters without KV layers that the policy could serve but no test runs (GPU-only or
# extra packages); every other method (draft_model, EAGLE, MTP, ...) has its own KV layers.
_KV_FREE_DRAFTERS = ("ngram_gpu", "suffix", "medusa", "mlp_speculator", "custom_class")


def _refuse_explicit_conflicts(args) -> None:
    """Flags the user set that the policy cannot honour, refused naming the flag."""
    import os

    if args.enable_chunked_prefill is False:
        raise PolicyConfigError(
            "--kv-policy streaming-sink needs chunked prefill (a long prompt is streamed through "
            "the window chunk by chunk); drop --no-enable-chunked-prefill")
    mode = getattr(args.compilation_config, "cudagraph_mode", None)
    if mode is not None and mode.has_full_cudagraphs():
        raise PolicyConfigError(
            f"--kv-policy streaming-sink's attention runs outside CUDA graphs until its decode "
            f"path's capture and replay are proven on a GPU (benchmarks/gpu_check.py; piecewise "
            f"graphs around it work); --compilation-config cudagraph_mode {mode.name} asks for "
            f"full graphs: use PIECEWISE or NONE, or leave it unset")
    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").strip().lower() in ("0", "false"):
        raise PolicyConfigError(
            "--kv-policy streaming-sink streams past the model's context (positions stay inside "
            "the cache), which VLLM_ALLOW_LONG_MAX_MODEL_LEN=0 forbids: unset it")


def _explain_stock_warnings(policy: SinkPolicy, max_model_len: int, context: int) -> None:
    """One line of ours after stock vLLM warnings that do not apply with the policy on."""
    if context and max_model_len > context:
        logger.info("streaming-sink: vLLM's warning above that positions past the model's %d-token "
                    "context 'lead to nan' does not apply, nor does the tokenizer's 'sequence length "
                    "is longer than the specified maximum' for longer prompts: the policy keeps every "
                    "RoPE position <= %d, inside the rotary table, however long the stream (up to %d)",
                    context, policy.max_position, max_model_len)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        logger.info("streaming-sink: vLLM's CPU build warns that Triton has no CPU backend or is "
                    "missing (and runs the V1 model runner): harmless, on CPU neither vLLM nor "
                    "streaming-sink runs Triton kernels")


def _refuse_state_layers(model_config) -> None:
    """Linear-attention / SSM hybrids (Qwen3-Next, Jamba, Falcon-H1, NemotronH, ...) get
    MambaSpec KV cache groups whose block size vLLM aligns with the attention groups'
    (platforms/interface.py ``_align_hybrid_block_size``); the policy handles attention
    groups only. Refused here, before the engine is built, naming the model type: from
    the HF config (streaming_sink/hybrid.py) or, where that finds nothing, from vLLM's
    own verdict on its model class."""
    from streaming_sink.hybrid import refusal, state_layers

    state = state_layers(model_config.hf_text_config)
    if state is None and (model_config.is_hybrid or model_config.is_attention_free):
        state = "state (Mamba / linear-attention) layers (vLLM's model class is hybrid or attention-free)"
    if state is not None:
        raise PolicyConfigError(refusal(model_config.model, model_config.hf_config, state))


@contextlib.contextmanager
def _allow_long_max_model_len():
    """The stream may be far longer than the model's context: positions stay
    inside the cache. vLLM reads this env flag through ``vllm.envs``."""
    import vllm.envs as envs

    had = "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in vars(envs)
    previous = vars(envs).get("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
    envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN = True
    try:
        yield
    finally:
        if had:
            envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN = previous
        else:
            del envs.VLLM_ALLOW_LONG_MAX_MODEL_LEN
