"""Run by test_vllm_cuda_build.py in a fresh process of the CUDA venv with
``VLLM_TARGET_DEVICE=cpu``: the mode vLLM itself offers for CPU-only CI on an
accelerator wheel. Without it, vLLM's CUDA build on a machine without a GPU stops
in its device check before a parser exists (``DeviceConfig``: "Failed to infer
device type"); with it, the CUDA build's own parser, CLI and engine config run.

Usage: python cpu_platform_probe.py MODEL_DIR. Prints one JSON line, prefixed
``PROBE ``, with what each step gave; the test asserts on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def main(model: str) -> dict:
    out: dict = {}
    # 1. `vllm serve --help=streaming-sink`, through vLLM's own CLI: it loads the
    #    general plugins (our entry point) and builds the serve parser.
    import vllm.entrypoints.cli.main as cli

    help_text = io.StringIO()
    sys.argv = ["vllm", "serve", "--help=streaming-sink"]
    with contextlib.redirect_stdout(help_text):
        try:
            cli.main()
        except SystemExit as e:
            out["serve_help_exit"] = e.code
    out["serve_help"] = help_text.getvalue()

    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from streaming_sink.policy import PolicyConfigError

    out["platform"] = type(current_platform).__name__

    # 2. the flags through vLLM's parser (EngineArgs.add_cli_args, after our plugin).
    def parse(*flags: str) -> dict:
        parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = parser.parse_args(["--model", model, "--block-size", "16", *flags])
            engine_args = EngineArgs.from_cli_args(args)
        except SystemExit as e:
            return {"argparse_exit": e.code, "stderr": stderr.getvalue()[-400:]}
        except PolicyConfigError as e:
            return {"refused": str(e)}
        return {"engine_args": engine_args, "additional_config": engine_args.additional_config}

    good = parse("--kv-policy", "streaming-sink", "--sink-tokens", "4", "--sink-window", "128")
    out["additional_config"] = good["additional_config"]
    out["bad"] = {name: {k: v for k, v in parse(*flags).items() if k != "engine_args"}
                  for name, flags in {
                      "kv_policy": ("--kv-policy", "bogus"),
                      "sink_tokens": ("--kv-policy", "streaming-sink", "--sink-tokens", "-1"),
                      "sink_window": ("--kv-policy", "streaming-sink", "--sink-window", "0"),
                      "no_policy": ("--sink-tokens", "4"),
                  }.items()}

    # 3. the policy resolved by create_engine_config on the tiny local model.
    engine_args = good["engine_args"]
    config = engine_args.create_engine_config()
    out["resolved"] = config.additional_config.get("streaming_sink")
    out["attention_backend"] = str(config.attention_config.backend)
    out["chunked_prefill"] = bool(config.scheduler_config.enable_chunked_prefill)
    out["max_model_len"] = config.model_config.max_model_len
    out["block_size"] = config.cache_config.block_size
    # 4. the runner vLLM 0.33 would pick on CUDA: per-request sinks are on V2's unsupported list.
    from vllm_sink.hooks.per_request_sinks import V2_UNSUPPORTED

    per_request_flags = ("--kv-policy", "streaming-sink", "--sink-tokens", "system", "--max-sink-tokens", "64",
                         "--sink-window", "128")
    per_request = parse(*per_request_flags)["engine_args"].create_engine_config()
    out["v2_unsupported"] = {"default_s": V2_UNSUPPORTED in config._get_v2_model_runner_unsupported_features(),
                             "system_mode": V2_UNSUPPORTED in per_request._get_v2_model_runner_unsupported_features()}
    # An explicit VLLM_USE_V2_MODEL_RUNNER=1 wins over that list: vLLM then refuses the config.
    import os

    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    try:
        parse(*per_request_flags)["engine_args"].create_engine_config()
        out["v2_forced"] = None
    except ValueError as e:
        out["v2_forced"] = str(e)
    finally:
        del os.environ["VLLM_USE_V2_MODEL_RUNNER"]
    # A window that is no multiple of --block-size is refused at this step.
    bad_window = parse("--kv-policy", "streaming-sink", "--sink-window", "100")["engine_args"]
    try:
        bad_window.create_engine_config()
        out["bad_window"] = None
    except PolicyConfigError as e:
        out["bad_window"] = str(e)
    return out


if __name__ == "__main__":
    result = main(sys.argv[1])
    print("PROBE " + json.dumps(result, default=str), flush=True)
