"""Per-request sink lengths in vLLM (issue 23): what each process knows of a request's ``S``.

* Front end (API server / ``LLM``): ``frontend_sink_tokens`` validates the request's
  ``SamplingParams.extra_args["sink_tokens"]`` (``vllm_xargs`` over HTTP) before the request
  reaches the engine (a ``VLLMValidationError``: a 400 naming the field); ``stamp`` writes the
  resolved ``S`` back into the request's params and folds it into its ``cache_salt`` when it
  differs from the server default (blocks written at other positions are never shared).
* Engine core (scheduler): ``request_sink_tokens`` reads a request's ``S`` again (never
  raising: a request that bypassed the front end gets the default, with one warning).
* Worker: ``WorkerSinks`` holds each batch row's ``S`` for the metadata builder (host
  tensor for the split, a persistent device tensor for the kernels) and each token's ``S``
  in a persistent device buffer the RoPE wrappers read (rope_remap.py); the model runner
  fills both once per step (hooks/per_request_sinks.py). A batch whose rows all have the server default
  keeps the old path: no per-row tensor reaches the kernels.

The rules themselves are the core's (streaming_sink/request_sinks.py, policy.py).
"""

from __future__ import annotations

import logging

import torch

from streaming_sink import flags as sink_flags
from streaming_sink.request_sinks import FIELD, RequestSinkError, request_sink_tokens as _checked, salted

logger = logging.getLogger("vllm.streaming_sink")


def _extra(params) -> dict:
    return getattr(params, "extra_args", None) or {}


def frontend_sink_tokens(params, opts: dict, v2_runner: bool = False) -> int:
    """The request's ``S``, validated; raises ``VLLMValidationError`` (HTTP 400) naming the field."""
    from vllm.exceptions import VLLMValidationError

    value = _extra(params).get(FIELD)
    try:
        s = _checked(value, opts["sink_tokens"], sink_flags.max_sink_tokens(opts))
    except RequestSinkError as e:
        raise VLLMValidationError(str(e), parameter=FIELD, value=value) from None
    if v2_runner and s != opts["sink_tokens"]:
        raise VLLMValidationError(
            f"{FIELD} other than the server's --sink-tokens {opts['sink_tokens']} needs vLLM's V1 model "
            f"runner (VLLM_USE_V2_MODEL_RUNNER=0); this server runs the V2 runner", parameter=FIELD, value=value)
    return s


def stamp(engine_request, sink_tokens: int, opts: dict) -> None:
    """Writes the resolved ``S`` into the engine request (its params are the request's own
    clone) and salts its prefix-cache identity when ``S`` is not the default."""
    params = engine_request.sampling_params
    if params is None:
        return
    params.extra_args = {**_extra(params), FIELD: sink_tokens}
    engine_request.cache_salt = salted(engine_request.cache_salt, sink_tokens, opts["sink_tokens"])


_warned: set[str] = set()


def request_sink_tokens(params, default: int, cap: int) -> int:
    """A request's ``S`` inside the engine (never raises: the front end already refused bad
    values; one that bypassed it runs with the default, logged once)."""
    value = _extra(params).get(FIELD)
    try:
        return _checked(value, default, cap)
    except RequestSinkError as e:
        if str(e) not in _warned:
            _warned.add(str(e))
            logger.warning("streaming-sink: %s; the request runs with --sink-tokens %d", e, default)
        return default


# ---- worker side ------------------------------------------------------------------

_STATES: dict[int, "WorkerSinks"] = {}  # id(vllm_config) -> its runner's state (one per worker)


class WorkerSinks:
    """Each batch row's and each token's ``S`` for one model runner, in persistent buffers."""

    def __init__(self, default: int, cap: int, max_reqs: int, max_tokens: int, device) -> None:
        self.default, self.cap = default, cap
        self.rows = torch.full((max_reqs,), default, dtype=torch.int32)  # host, row order of the batch
        self.rows_device = torch.full((max_reqs,), default, dtype=torch.int32, device=device)
        self.tokens = torch.full((max_tokens,), default, dtype=torch.int64, device=device)
        self.num_reqs = 0
        self.uniform = True  # every row of the last step has the default S
        self.min = self.max = default
        self._tokens_default = True

    @classmethod
    def register(cls, vllm_config, state: "WorkerSinks") -> None:
        _STATES[id(vllm_config)] = state

    @staticmethod
    def of(vllm_config) -> "WorkerSinks | None":
        return _STATES.get(id(vllm_config))

    def fill(self, req_ids, num_scheduled_tokens, requests) -> None:
        """One step: ``req_ids`` in batch row order, their scheduled token counts, and the
        runner's request states (``sampling_params``)."""
        n = len(req_ids)
        values = [request_sink_tokens(requests[r].sampling_params, self.default, self.cap) for r in req_ids]
        self.num_reqs = n
        self.uniform = all(v == self.default for v in values)
        if self.uniform:
            self.min = self.max = self.default
            if not self._tokens_default:
                self.tokens.fill_(self.default)
                self._tokens_default = True
            return
        rows = torch.tensor(values, dtype=torch.int32)
        self.rows[:n] = rows
        self.min, self.max = min(values), max(values)
        self.rows_device[:n].copy_(rows, non_blocking=True)
        counts = torch.as_tensor(num_scheduled_tokens[:n], dtype=torch.int64)
        per_token = torch.repeat_interleave(rows.long(), counts)
        self.tokens[:per_token.numel()].copy_(per_token, non_blocking=True)
        self._tokens_default = False

    def rows_for(self, num_reqs: int):
        """(host rows, device rows, min S, max S) of the current step, or None when every row
        has the default ``S`` (or the step is not one the runner filled: a dummy run)."""
        if self.uniform or num_reqs != self.num_reqs:
            return None
        return self.rows[:num_reqs], self.rows_device[:num_reqs], self.min, self.max
