"""Touch point 5: after the model is built (``load_model`` of the GPU, CPU and V2 runners), the
attention layers' RoPE positions are remapped into the cache (rope_remap.py) and the backend
gets the policy and the per-request S buffers (per_request_sinks.py).
"""

from __future__ import annotations

import functools
import importlib
import logging

from .. import config as sink_config
from .per_request_sinks import worker_sinks

logger = logging.getLogger("vllm.streaming_sink")


def install() -> None:
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

            from .. import rope_remap
            from ..backend import SinkBackend, SinkImpl

            SinkBackend.policy = policy
            state = worker_sinks(self, policy)  # per-request S: each row's and token's (section 9)
            SinkBackend.max_sink_tokens = None if state is None else state.cap
            n = rope_remap.install(self.get_model(), SinkImpl, Attention,
                                   token_sinks=None if state is None else state.tokens)
            logger.info("streaming-sink: %d attention layers use positions inside the cache", n)
        return result

    return wrapped
