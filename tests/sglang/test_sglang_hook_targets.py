"""The table of SGLang touch points (``sglang_sink.hooks.hook_targets``) against the SGLang
installed here (0.5.23): every target exists with the parameters our code calls, overrides
or receives through a hook, and every method our classes override is listed. A rename or a
changed signature in a new SGLang fails here, by name, before any engine runs.
"""

import sglang_hook_check as check

from sglang_sink.hooks import TARGETS, hook_targets


def _plugins_applied():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()  # as in every SGLang process: the check must see through our patches
    return HookRegistry


def test_hook_targets_exist_with_expected_parameters():
    import sglang

    registry = _plugins_applied()
    assert set(TARGETS) <= registry._patched  # every hook applied
    targets = hook_targets()
    assert len(targets) > 100
    problems = check.check_all(targets)
    assert not problems, "SGLang {} differs from sglang_sink/hooks.py hook_targets():\n  {}".format(
        sglang.__version__, "\n  ".join(problems))


def test_every_override_is_listed_with_our_parameters():
    classes = {c.__name__ for c in check.our_classes()}
    assert classes == {"StreamingSinkAttnBackend", "StreamingRadixCache"}, classes
    problems = check.check_overrides(hook_targets())
    assert not problems, "\n  ".join(["overrides vs hook_targets():", *problems])


def test_the_check_sees_a_rename_and_a_changed_signature():
    _plugins_applied()
    assert check.check_target("attr", "sglang.srt.mem_cache.radix_cache:RadixCache.root_nod", None).endswith(
        "not found (AttributeError: root_nod)")
    problem = check.check_target("override", "sglang.srt.mem_cache.radix_cache:RadixCache.evict", ("num_tokens",))
    assert "parameters ('params',), our override expects ('num_tokens',)" in problem
    problem = check.check_target("call", "sglang.srt.mem_cache.registry:register_radix_cache_backend",
                                 ("name", "factory", "priority"))
    assert "leading parameters ('name', 'factory')" in problem
    # A patched target is checked as SGLang's original (HookRegistry wraps it).
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    assert ScheduleBatch.maybe_evict_swa.__code__.co_filename.endswith("hook_registry.py")
    assert check.check_target("hooked", "sglang.srt.managers.schedule_batch:ScheduleBatch.maybe_evict_swa",
                              ()) is None
    assert "our hooked expects ('kv',)" in check.check_target(
        "hooked", "sglang.srt.mem_cache.base_prefix_cache:BasePrefixCache.free_kv_row", ("kv",))


def test_every_hook_names_a_function_of_ours():
    """``TARGETS`` names our hooks as "module:function", imported on their first call:
    each must exist, and each touch point 1-10 but 8 (a registry, not a hook) has one."""
    import importlib

    points = set()
    for target, (point, kind, ref) in TARGETS.items():
        module, _, name = ref.partition(":")
        assert callable(getattr(importlib.import_module(f"sglang_sink.{module}"), name, None)), (target, ref)
        assert kind in ("AROUND", "AFTER"), target
        points.add(point)
    assert points == {1, 2, 3, 4, 5, 6, 7, 9, 10}
