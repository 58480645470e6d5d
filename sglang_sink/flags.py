"""Touch point 1 (hooks.py): the flags, their refusals and the engine defaults.

``--kv-policy``, ``--sink-tokens``, ``--sink-window``, ``--max-sink-tokens`` on the stock
launcher (and its ``--help``) and as ``sglang.Engine`` keywords. The policy is resolved and every refusal
raised here, at startup, in the main process: ServerArgs is a msgspec Struct (no new
fields), so the settings ride as one extra attribute (config.py), which SGLang pickles
to its children. The rule: a flag the user set is honoured or refused naming it; only a
default is changed, in one log line. ServerArgs is still unresolved here (SGLang 0.5.23
declares its own defaults in ``resolve_once``, later), so a set field is the user's.
No SGLang import at module level.
"""

from __future__ import annotations

import logging
import os

from streaming_sink.flags import add_flags, check_flags, resolved_settings
from streaming_sink.hf_config import check_model_config, layer_window, rotary_table_len
from streaming_sink.policy import PolicyConfigError, SinkPolicy

from . import config as sink_config
from .hooks import RADIX_BACKEND, check_hooks_applied, check_version

# A child of "sglang" so our lines go through SGLang's own log handlers.
logger = logging.getLogger("sglang.streaming_sink")


def add_cli_args(original, parser, *args, **kwargs):
    """AROUND ``ServerArgs.add_cli_args(parser)``."""
    result = original(parser, *args, **kwargs)
    add_flags(parser, "sglang")
    return result


def from_cli_args(original, cls, args):
    """AROUND ``ServerArgs.from_cli_args(cls, args)`` (the launcher)."""
    server_args = original(cls, args)
    apply_flags(server_args, {f: getattr(args, f, None) for f in sink_config.FLAGS})
    return server_args


def engine_server_args(engine, *args, kv_policy=None, sink_tokens=None, sink_window=None,
                       max_sink_tokens=None, **kwargs):
    """``sglang.Engine(**kwargs)`` builds its ServerArgs through this class attribute
    (looked up after Engine.__init__ loads plugins); ServerArgs refuses unknown keywords."""
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(*args, **kwargs)
    apply_flags(server_args, {"kv_policy": kv_policy, "sink_tokens": sink_tokens, "sink_window": sink_window,
                              "max_sink_tokens": max_sink_tokens})
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
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(server_args.model_path)
    check_model_config(cfg, server_args.model_path)  # hybrids, RoPE (core rules, hf_config.py)
    _streaming_defaults(server_args, list(getattr(cfg, "architectures", None) or ()))
    # SGLang's page size is 1 (set or refused above): the policy's block size.
    # The window fits every request's positions, S up to --max-sink-tokens (per-request sinks).
    policy = SinkPolicy.resolve(opts["sink_tokens"], opts["sink_window"], 1, rotary_table_len(cfg), "the model",
                                max_sink_tokens=opts["max_sink_tokens"])
    # A layer window of its own (Gemma 3, GPT-OSS) must fit --sink-window + 1; the
    # backend checks the built layers again (backend.layer_ropes).
    policy.check_layer_window(layer_window(cfg), "a sliding_attention layer")
    setattr(server_args, sink_config.ATTR, resolved_settings(opts, policy))
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


# --kv-cache-dtype values served with the policy: a plain pool is what it says. SGLang 0.5.23
# on CPU runs no fp8 pool the policy could read: fp8_e4m3 only with Intel AMX and the
# intel_amx backend (ours subclasses torch_native), fp8_e5m2 not at all (docs/fp8-kv-cache.md).
PLAIN_KV_DTYPES = ("auto", "bf16", "bfloat16")


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
        (f"--kv-cache-dtype {kw.get('kv_cache_dtype')} (SGLang runs an fp8 KV cache on CPU only with "
         f"Intel AMX and its intel_amx attention backend, which the policy's backend replaces; "
         f"{'/'.join(PLAIN_KV_DTYPES)} are served)", kw.get("kv_cache_dtype") not in (None, *PLAIN_KV_DTYPES)),
        # SGLang 0.5.23's speculative workers (NGRAM included) import sgl_kernel's CUDA ops:
        # stock SGLang on CPU, where the policy is checked, runs none of them.
        ("--speculative-algorithm (no speculative worker of SGLang runs on CPU, where the policy "
         "is checked; vLLM serves n-gram speculation under the policy)",
         kw.get("speculative_algorithm") is not None),
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
