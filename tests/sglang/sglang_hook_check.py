"""Checks the table of SGLang touch points (``sglang_sink.hooks.hook_targets``) against the
installed SGLang, without a GPU: every target exists with the parameters our code calls,
overrides or receives through a hook. The SGLang twin of tests/hook_check.py (vLLM), whose
engine-free parts it reuses: how a name resolves, how a call binds, the parameter names
of a function.

Patched targets are seen through: ``HookRegistry`` wraps the original with
``functools.wraps`` (``__wrapped__``), so the check gives the same answer before and
after the plugin's hooks are applied.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import hook_check  # tests/hook_check.py: _check_call, _params, _names, _raw

_OUR_MODULES = ("sglang_sink.backend", "sglang_sink.radix_cache")


def sglang_original(fn):
    """The SGLang function behind HookRegistry's wrappers, else ``fn`` itself."""
    while inspect.isfunction(fn) and fn.__code__.co_filename.endswith("hook_registry.py") \
            and getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


def _assigned_in_source(cls, name: str) -> bool:
    """``self.<name>`` assigned (plain, annotated, augmented, or in a tuple target) in the
    body of ``cls`` or an SGLang base."""
    for base in cls.__mro__:
        if not base.__module__.startswith("sglang."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and t.attr == name and \
                            isinstance(t.value, ast.Name) and t.value.id == "self":
                        return True
    return False


def resolve(target: str):
    """(owner, name, value) for ``"module:Qual.name"`` (hook_check.resolve); value is
    ``hook_check._MISSING`` for an instance attribute, here also one an SGLang class assigns."""
    try:
        return hook_check.resolve(target)
    except AttributeError:
        module_name, _, qualname = target.partition(":")
        *path, name = qualname.split(".")
        owner = importlib.import_module(module_name)
        for part in path:
            owner = getattr(owner, part)
        if inspect.isclass(owner) and _assigned_in_source(owner, name):
            return owner, name, hook_check._MISSING
        raise


def check_target(kind: str, target: str, expected) -> str | None:
    """None when ``target`` is as the table says; else what differs."""
    try:
        _, _, value = resolve(target)
    except (ImportError, AttributeError) as e:
        return f"{target}: not found ({type(e).__name__}: {e})"
    if kind == "attr":
        return None
    if inspect.isclass(value):  # a call of a class: its __init__
        value = value.__init__
    if value is hook_check._MISSING or not callable(value):
        return f"{target}: found, but not a function ({kind} expected)"
    params = hook_check._params(sglang_original(value))
    if kind in ("hooked", "override"):
        actual = hook_check._names(params)
        if actual != tuple(expected):
            return f"{target}: parameters {actual}, our {kind} expects {tuple(expected)}"
        return None
    if kind == "call":
        problem = hook_check._check_call(params, tuple(expected))
        return f"{target}: {problem} (has {hook_check._names(params)})" if problem else None
    return f"{target}: unknown kind {kind!r}"


def check_all(targets) -> list[str]:
    return [p for p in (check_target(*t) for t in targets) if p]


def our_classes() -> list[type]:
    """Our subclasses of SGLang classes (the attention backend, the radix cache)."""
    classes = []
    for module_name in _OUR_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if (inspect.isclass(value) and value.__module__ == module_name
                    and any(b.__module__.startswith("sglang.") for b in value.__mro__)):
                classes.append(value)
    return classes


def check_overrides(targets) -> list[str]:
    """Every name our classes override on an SGLang base is in the table, with our
    parameters (tests/hook_check.py's rule, over SGLang's bases and our resolve)."""
    return hook_check.check_overrides(targets, classes=our_classes(), engine="sglang", resolve_target=resolve)
