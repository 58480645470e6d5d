"""Touch point 3: ``--attention-backend CUSTOM`` resolves, on every platform, to
``backend.wrap(inner)``, inner being what the platform's own ``get_attn_backend_cls`` returns for
the user's ``--attention-backend`` (CPU_ATTN, FLASH_ATTN, FLASHINFER, TRITON_ATTN) or for none.
"""

from __future__ import annotations

from streaming_sink.policy import PolicyConfigError

from .. import config as sink_config

# What the policy's backend may wrap (backend.py): the engine's own kernels for dense rows.
INNER_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")


def inner_backend_choice(selected, attention_config) -> str | None:
    """An explicit ``--attention-backend`` (or ``--attention-config``'s backend) becomes
    the inner backend (None: vLLM picks). Per-kind backends would bypass the policy."""
    config_backend = getattr(attention_config, "backend", None)
    if getattr(attention_config, "backend_per_kind", None):
        raise PolicyConfigError(
            "--kv-policy streaming-sink runs every attention layer through its own backend; "
            "--attention-config backend_per_kind is not supported with it: drop it")
    if config_backend is not None:
        if selected is not None:
            return inner_backend_choice(selected, None)  # vLLM refuses both: let it say so
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


def install() -> None:
    """CUSTOM resolves, on every platform, to ``backend.wrap(inner)`` where inner is what
    the platform's own selection returns for the user's choice (or for none)."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .. import backend

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
