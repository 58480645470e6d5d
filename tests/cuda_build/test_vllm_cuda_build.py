"""Smoke test of the plugin against vLLM's CUDA wheel (the build users install), pinned
(scripts/setup-vllm-cuda.sh), on a machine without a GPU. It catches a rename or a changed
signature in the production build: every touch point in ``vllm_sink.hooks.hook_targets``
exists with the parameters our code calls or overrides; the plugin installs through
vLLM's entry point; the CUDA backend, KV spec and Triton module import; the policy's
checks run up to vLLM's own device check; and, in a second process with vLLM's CPU
platform (``VLLM_TARGET_DEVICE=cpu``), the flags parse through vLLM's parser and CLI and
the policy resolves in ``create_engine_config``.

Test order matters: the entry-point test runs before anything here imports ``vllm_sink``
(whose import installs the hooks too); the first test starts the second process, so it
runs beside the in-process tests (~30 s of CPU each).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import hook_check
import pytest

PINNED = "0.33.0"  # scripts/setup-vllm-cuda.sh
PROBE = Path(__file__).with_name("cpu_platform_probe.py")


def test_vllm_is_the_pinned_cuda_build(probe_started):
    import torch
    import vllm

    assert metadata.version("vllm") == PINNED == vllm.__version__.split("+")[0]
    assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"


def test_plugin_installs_through_vllm_entry_point():
    eps = [ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "streaming_sink"]
    assert [ep.value for ep in eps] == ["vllm_sink.plugin:register"]
    already = "vllm_sink" in sys.modules
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sink import hooks

    assert hooks._installed and not already, "vllm_sink was imported before vLLM loaded its plugins"
    assert PINNED in hooks.CHECKED_VLLM_VERSIONS
    assert EngineArgs.from_cli_args.__func__.__module__ == "vllm_sink.hooks.engine_config"
    for fn in (EngineArgs.add_cli_args, EngineArgs.create_engine_config, EngineArgs.__init__,
               AsyncEngineArgs.__init__, vars(GPUModelRunner)["load_model"]):
        assert hasattr(fn, "__wrapped__"), f"{fn.__qualname__} is not hooked"
    # CUSTOM resolves through the platform's own selection, wrapped (backend.wrap).
    from vllm.platforms import current_platform

    assert type(current_platform).get_attn_backend_cls.__func__.__module__ == "vllm_sink.hooks.attention_backend"


def test_hook_targets_exist_with_expected_parameters():
    from vllm_sink.hooks import hook_targets

    targets = hook_targets("cuda")
    assert len(targets) > 80
    problems = hook_check.check_all(targets)
    assert not problems, "vLLM {} (CUDA build) differs from vllm_sink.hooks.hook_targets():\n  {}".format(
        PINNED, "\n  ".join(problems))


def test_every_override_is_listed_with_our_parameters():
    from vllm_sink.hooks import hook_targets

    problems = hook_check.check_overrides(hook_targets("cuda"), "cuda")
    assert not problems, "\n  ".join(["overrides vs hook_targets():", *problems])


def test_backend_kv_spec_and_triton_module_import():
    import torch
    import triton
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    import streaming_sink.triton_attention as triton_attention
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from vllm_sink import backend
    from vllm_sink.kv_manager import StreamingSinkManager, StreamingSinkSpec

    # One wrapper per inner backend vLLM may pick on CUDA, each the inner backend's
    # subclass, resolvable by the qualified name vLLM's selector imports.
    wrapped = {}
    for name in ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"):
        inner = AttentionBackendEnum[name].get_class()
        cls = resolve_obj_by_qualname(backend.class_path(inner))
        assert issubclass(cls, inner) and cls.get_name() == "CUSTOM"
        assert issubclass(cls.get_impl_cls(), inner.get_impl_cls())
        assert issubclass(cls.get_impl_cls(), backend.SinkImpl)
        assert issubclass(cls.get_builder_cls(), inner.get_builder_cls())
        assert issubclass(cls.get_builder_cls(), backend.SinkMetadataBuilder)
        wrapped[name] = cls
    assert callable(triton_attention.paged_attention) and triton.__version__
    spec = StreamingSinkSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float16,
                             sliding_window=128, sink_tokens=4, max_sink_tokens=4)
    assert isinstance(spec, SlidingWindowSpec)
    assert KVCacheSpecRegistry.get_manager_class(spec) is StreamingSinkManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(spec) is StreamingSinkSpec
    # 1 sink block + the window's 8 blocks + the block being written, per request.
    assert spec.max_admission_blocks_per_request(4096, 131072) == spec.policy.max_live_blocks(4096)
    # customize_spec turns a full-attention layer's spec into ours (the policy is set
    # by the model-load hook; here by hand).
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    backend.SinkBackend.policy = spec.policy
    try:
        full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float16)
        for cls in wrapped.values():
            assert cls.customize_spec(full) == spec
    finally:
        backend.SinkBackend.policy = None


# ---- the policy's checks, up to vLLM's device check (this machine's real platform) ----

def _engine_args(model: str, **kw):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_sink  # noqa: F401  (hooks: the keywords)

    return EngineArgs(model=model, block_size=16, kv_policy="streaming-sink", sink_tokens=4,
                      sink_window=128, **kw)


@pytest.fixture(scope="module")
def no_device():
    from vllm.platforms import current_platform

    if current_platform.device_type:
        pytest.skip(f"vLLM found a device here ({current_platform.device_type}): no device check to reach")


def test_policy_runs_up_to_vllm_device_check(tiny_llama, no_device):
    import vllm.envs as envs

    from vllm_sink.config import DEFAULT_STREAM_LEN

    engine_args = _engine_args(tiny_llama)
    assert engine_args.additional_config == {
        "streaming_sink": {"kv_policy": "streaming-sink", "sink_tokens": 4, "sink_window": 128,
                           "max_sink_tokens": 4, "sink_mode": "number"}}
    # vLLM's DeviceConfig, with the platform's empty device type: "Device string must not
    # be empty" here (create_engine_config), "Failed to infer device type" for "auto".
    with pytest.raises(RuntimeError, match="Device string must not be empty|Failed to infer device type") as failure:
        engine_args.create_engine_config()
    frames = [(entry.path.as_posix(), entry.name) for entry in failure.traceback]
    assert frames[-1] == (frames[-1][0], "__post_init__") and frames[-1][0].endswith("vllm/config/device.py"), \
        f"the failure is not vLLM's device setup: {frames[-3:]}"
    assert any(path.endswith("vllm_sink/hooks/engine_config.py") and name == "_create_streaming_config"
               for path, name in frames), "our create_engine_config hook did not hand over to vLLM's"
    # Our hook ran before vLLM's config stopped: backend, chunked prefill, stream length.
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert engine_args.attention_backend == AttentionBackendEnum.CUSTOM
    assert engine_args.enable_chunked_prefill is True
    assert engine_args.max_model_len == DEFAULT_STREAM_LEN
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in vars(envs)  # restored after the failure


@pytest.mark.parametrize("kw, message", [
    # --attention-backend names the inner backend: FLASH_ATTN etc. are honoured, a backend
    # the policy cannot wrap is refused naming the flag
    ({"attention_backend": "FLEX_ATTENTION"}, "--attention-backend FLEX_ATTENTION is not one of them"),
    ({"kv_cache_dtype": "int8_per_token_head"}, "does not support --kv-cache-dtype int8_per_token_head"),
    ({"enable_chunked_prefill": False}, "needs chunked prefill"),
])
def test_refused_by_us_before_vllm_device_check(tiny_llama, no_device, kw, message):
    from streaming_sink.policy import PolicyConfigError

    with pytest.raises(PolicyConfigError, match=message):
        _engine_args(tiny_llama, **kw).create_engine_config()


def test_bad_values_refused_with_our_message(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_sink  # noqa: F401
    from streaming_sink.policy import PolicyConfigError

    with pytest.raises(PolicyConfigError, match="--sink-tokens must be >= 0"):
        EngineArgs(model=tiny_llama, kv_policy="streaming-sink", sink_tokens=-1)
    with pytest.raises(PolicyConfigError, match="--kv-policy must be one of"):
        EngineArgs(model=tiny_llama, kv_policy="bogus")


# ---- vLLM's parser, CLI and engine config on its CPU platform (a second process) ----

@pytest.fixture(scope="module")
def probe_started(tiny_llama, tmp_path_factory):
    """The second process, started by the first test so it runs beside the others."""
    logs = tmp_path_factory.mktemp("probe")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        process = subprocess.Popen([sys.executable, str(PROBE), tiny_llama], env=env, stdout=out, stderr=err)
    yield process, logs
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def probe(probe_started):
    process, logs = probe_started
    try:
        rc = process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        rc = process.wait()
    lines = [line for line in (logs / "stdout").read_text().splitlines() if line.startswith("PROBE ")]
    assert rc == 0 and lines, f"probe failed (exit {rc}):\n{(logs / 'stderr').read_text()[-3000:]}"
    return json.loads(lines[-1][len("PROBE "):])


def test_serve_help_lists_our_flags(probe):
    assert probe["platform"] == "CpuPlatform"
    assert probe["serve_help_exit"] == 0
    for flag in ("--kv-policy {none,streaming-sink}", "--sink-tokens", "--sink-window"):
        assert flag in probe["serve_help"]


def test_flags_parse_through_vllm_parser(probe):
    assert probe["additional_config"] == {
        "streaming_sink": {"kv_policy": "streaming-sink", "sink_tokens": 4, "sink_window": 128,
                           "max_sink_tokens": 4, "sink_mode": "number"}}


@pytest.mark.parametrize("case, expected", [
    ("kv_policy", "argument --kv-policy: invalid choice: 'bogus'"),
    ("sink_tokens", "--sink-tokens must be >= 0 (0 is plain window attention), got -1"),
    ("sink_window", "--sink-window must be a positive number of tokens, got 0"),
    ("no_policy", "--sink-tokens / --sink-window / --max-sink-tokens need --kv-policy streaming-sink"),
])
def test_bad_flags_refused_through_vllm_parser(probe, case, expected):
    result = probe["bad"][case]
    assert expected in (result.get("refused") or result.get("stderr", "")), result


def test_policy_resolves_in_create_engine_config(probe):
    assert probe["resolved"] == {"kv_policy": "streaming-sink", "sink_tokens": 4, "sink_window": 128,
                                 "max_sink_tokens": 4, "sink_mode": "number",
                                 "window_tokens": 128, "block_size": 16, "inner_backend": None}
    assert probe["attention_backend"] == "AttentionBackendEnum.CUSTOM"
    assert probe["chunked_prefill"] is True
    assert probe["max_model_len"] == 131072 and probe["block_size"] == 16
    assert probe["bad_window"].startswith("--sink-window must be a positive multiple of the KV block size (16)")


def test_per_request_sinks_keep_vllm_off_its_v2_runner(probe):
    """The CUDA build's default runner is V2, not hooked for per-request S: a server that enables
    them (here --sink-tokens system) has them on V2's unsupported list, so vLLM picks V1."""
    assert probe["v2_unsupported"] == {"default_s": False, "system_mode": True}


def test_an_explicit_v2_runner_with_per_request_sinks_is_refused_at_startup(probe):
    """VLLM_USE_V2_MODEL_RUNNER=1 is the user's choice and vLLM reads it first: the same list then
    makes vLLM refuse the config, naming our flags, rather than serve requests it would 400."""
    assert probe["v2_forced"] is not None, "V2 forced with per-request sinks was accepted"
    assert "Model Runner V2 does not yet support" in probe["v2_forced"], probe["v2_forced"]
    assert "--sink-tokens system, --max-sink-tokens" in probe["v2_forced"], probe["v2_forced"]
