"""SIGTERM to a real `vllm serve --kv-policy streaming-sink` with 32 open streams.

As an operator (or Kubernetes) stops a server under load: the signal goes to the
`vllm serve` process only. Every stream must end within 30 s of SIGTERM -- a finish
event (e.g. finish_reason "abort"), an error event, or the server closing the
connection -- and the server's whole process group (API server, engine core, worker)
must exit within 30 s too. A stream that is left open with nothing more to say (the
hang of issue 15) fails the test. The run itself is benchmarks/sigterm_shutdown.py's,
over loopback, one server start; docs/shutdown.md has the numbers.

Stock vLLM 0.32 with one API server loses a race on SIGTERM (docs/shutdown.md: 3/3 stock and
2/3 policy runs left all 64 streams hanging), so the server runs here as docs/shutdown.md tells
operators to: ``--api-server-count 2``, where vLLM's supervising process ends the API server
processes itself. ``SHUTDOWN_TEST_SERVER_ARGS=""`` runs the test on the default single API
server instead, which shows the hang as a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sigterm_shutdown", ROOT / "benchmarks" / "sigterm_shutdown.py")
sigterm_shutdown = importlib.util.module_from_spec(_spec)
sys.modules["sigterm_shutdown"] = sigterm_shutdown  # dataclasses look their module up
_spec.loader.exec_module(sigterm_shutdown)

BOUND_S = 30.0  # issue 15: every stream ends, and the server exits, within 30 s of SIGTERM
STREAMS = 32
SERVER_ARGS = shlex.split(os.environ.get("SHUTDOWN_TEST_SERVER_ARGS", "--api-server-count 2"))


def test_sigterm_with_open_streams_ends_every_stream_and_exits(tmp_path):
    from tiny_models import build_tiny_llama

    # The tiny Llama (256-token context) asked for 130,000 tokens per stream, 500x its context,
    # with --max-model-len past it: which also checks that the policy's settings reach vLLM's
    # extra API server processes (hooks/engine_config.py, from_cli_args). Every stream must still
    # run at SIGTERM: on a loaded CI box the 32 streams took 13 s to all start, and the first
    # ones, at 3000 tokens, had ended by then (alone, a stream makes ~1000 tokens/s).
    model = build_tiny_llama(tmp_path / "tiny")
    # startup_timeout: a shared 2-core machine at load average ~24 once took > 400 s to start.
    args = argparse.Namespace(
        streams=STREAMS, max_tokens=130000, max_model_len=131072, prompt_tokens=16, settle=1.0,
        client_timeout=BOUND_S, exit_timeout=BOUND_S, startup_timeout=900.0, server_arg=SERVER_ARGS)
    run = sigterm_shutdown.one_run(args, "policy", 0, model, tmp_path)

    assert len(run.streams) == STREAMS
    assert all(s.first_token_at is not None for s in run.streams)  # all were streaming at SIGTERM
    hung = [s for s in run.streams if s.kind == "hung"]
    assert not hung, (f"{len(hung)}/{STREAMS} streams got no finish, error or close within {BOUND_S:.0f} s "
                      f"of SIGTERM; server exit after {run.server_exit_s} s\n{run.log_tail}")
    assert all(s.kind in ("finish", "error", "closed") for s in run.streams), [s.kind for s in run.streams]
    assert all(s.end_s is not None and s.end_s <= BOUND_S for s in run.streams)
    assert run.server_exit_s is not None and run.server_exit_s <= BOUND_S, (run.server_exit_s, run.log_tail)
    # The whole process group is gone, by itself (we did not have to SIGKILL it).
    assert run.group_exit_s is not None and run.group_exit_s <= BOUND_S, (run.group_exit_s, run.log_tail)
    assert not run.killed
