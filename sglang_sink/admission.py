"""Touch points 6 and 7 (hooks.py): admission, length limits and the default request length,
with the policy on only.

SGLang reserves a request's whole length in the KV pool (prompt + every new token) and
caps a request's length at the pool's size. Under the policy a request never holds more
than its live bound, ``S + W + 1 + chunk`` slots (its own ``S``: per-request sinks), so
that is what it claims, and the longest request is ``--context-length``. With ``state.policy`` None every hook passes
through unchanged. No SGLang import at module level.
"""

from __future__ import annotations

import logging

from . import config as sink_config
from .state import state

logger = logging.getLogger("sglang.streaming_sink")


def _demand_cap(chunk: int | None = None, req=None) -> int:
    """The live bound of ``req`` (its own ``S``); with no request at hand (PrefillBudget's
    calls outside ``add_one_req``, e.g. a chunked continuation) that of the largest ``S``
    a request may carry."""
    req = req if req is not None else state.admitting
    policy = state.policy_of(req) if req is not None else state.policy_for(state.max_sink_tokens)
    return policy.max_live_blocks(max(chunk or 1, 1)) * policy.block_size


def max_new_tokens_for_memory(original, allocator, input_tokens, max_new_tokens, **kwargs):
    """AROUND ``BaseTokenToKVPoolAllocator.max_new_tokens_for_memory``: no clipping to the pool."""
    if state.policy is None:
        return original(allocator, input_tokens, max_new_tokens, **kwargs)
    return max_new_tokens  # the stream never holds more than its window


def check_prefill(original, budget, **kwargs):
    """AROUND ``PrefillBudget.check_prefill``: a prompt's demand is at most its live bound."""
    if state.policy is not None:
        cap = _demand_cap(kwargs.get("chunk_limit"))
        kwargs["total_tokens"] = min(kwargs["total_tokens"], cap)
    return original(budget, **kwargs)


def reserve(original, budget, extend_input_len, max_new_tokens, **kwargs):
    """AROUND ``PrefillBudget.reserve``: what an admitted request keeps claiming."""
    if state.policy is not None:
        max_new_tokens = min(max_new_tokens, _demand_cap())
    return original(budget, extend_input_len, max_new_tokens, **kwargs)


def add_one_req(original, adder, req, *args, **kwargs):
    """AROUND ``PrefillAdder.add_one_req``: ``ignore_eos`` requests take the normal path
    (SGLang's ignore-eos estimate assumes every generated token stays in the pool)."""
    if state.policy is None:
        return original(adder, req, *args, **kwargs)
    ignore_eos = req.sampling_params.ignore_eos
    req.sampling_params.ignore_eos = False  # read only to pick the admission path
    state.admitting = req  # PrefillBudget's checks inside see its own live bound
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        req.sampling_params.ignore_eos = ignore_eos
        state.admitting = None


def running_offset(original, adder, req):
    """AROUND ``PrefillAdder._get_running_request_total_token_offset``: a running request
    still claims its live bound at most."""
    offset = original(adder, req)
    return offset if state.policy is None else min(offset, _demand_cap(req=req))


def request_limits(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.init_model_worker`` (touch point 7): SGLang caps the longest request
    at ``min(context, KV pool) - 1``; under the policy only the context applies. The
    scheduler's named limits are raised by the same amount (SGLang's input margin kept)."""
    if sink_config.policy_of(scheduler.server_args) is None:
        return result
    longest = scheduler.model_config.context_len - 1
    extra = longest - scheduler.max_req_len
    if extra > 0:
        scheduler.max_req_len += extra
        scheduler.max_req_input_len += extra
    logger.info("streaming-sink: a request without max_new_tokens (OpenAI: max_tokens) gets at most %d "
                "new tokens (the model's context, as without the policy); longer streams: set it per "
                "request", model_context(scheduler))
    return result


def default_max_new_tokens(original, scheduler, req):
    """AROUND ``Scheduler.init_req_max_new_tokens`` (touch point 7): a request that sets no
    max_new_tokens (an OpenAI request without max_tokens) gets at most the model's own
    context, as without the policy; SGLang would give it up to --context-length, which under
    the policy is a whole stream's (131072 by default). What a request sets is kept."""
    if req.sampling_params.max_new_tokens is None and sink_config.policy_of(scheduler.server_args) is not None:
        req.sampling_params.max_new_tokens = model_context(scheduler)
    return original(scheduler, req)


def model_context(scheduler) -> int:
    """The context SGLang derives from the model's config when --context-length is not given."""
    from sglang.srt.utils.hf_transformers_utils import get_context_length

    return get_context_length(scheduler.model_config.hf_text_config)
