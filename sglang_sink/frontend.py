"""Touch point 10 (hooks.py): per-request sinks in SGLang's front end (issue 23).

A request asks for its own sink length ``S`` through SGLang's own request extension,
``custom_params`` (a sampling parameter; the OpenAI endpoints take it as a top-level body
field, ``extra_body`` in the OpenAI client): ``{"custom_params": {"sink_tokens": N}}``.
Everything here runs in the process that tokenizes (the HTTP server or ``sglang.Engine``'s
own process), before a request reaches a scheduler:

* ``tokenized_request`` (AROUND ``TokenizerManager._create_tokenized_object``, where the
  prompt's final token ids are known): the value is checked by the core's rule
  (``streaming_sink.request_sinks``: an int, ``0 <= S <= --max-sink-tokens``); a bad one
  raises ``RequestSinkError`` (a ValueError: SGLang answers 400 with its one line, naming
  the field). The request leaves with ``custom_params["sink_tokens"] = S`` (what the
  scheduler reads, state.sink_tokens_of) and, when ``S`` is not the server's, ``S`` folded
  into its radix ``extra_key`` (the core's ``salted``): SGLang's tree never shares nodes
  across extra keys, so only requests whose positions agree share slots.
* ``chat_request`` (AROUND ``OpenAIServingChat._convert_to_internal_request``), with
  ``--sink-tokens system[:N]``: a chat request with a system message and no ``sink_tokens``
  of its own gets ``S`` = the tokens of its rendered system turn. Its leading system
  message(s) are rendered alone by SGLang's own chat preprocessing (same template, tools
  and template arguments, no generation prompt); the ids travel in ``custom_params`` under
  a private key (as SGLang's own renderer hands the scheduler its reasoning terminator),
  and ``tokenized_request`` applies the core's common-prefix rule against the final prompt
  ids. A system turn longer than ``--max-sink-tokens`` is pinned up to it (logged once).

No SGLang import.
"""

from __future__ import annotations

import logging

from streaming_sink.flags import max_sink_tokens, system_mode
from streaming_sink.request_sinks import FIELD, capped, request_sink_tokens, salted, system_turn_tokens

from . import config as sink_config

logger = logging.getLogger("sglang.streaming_sink")

# custom_params key of the rendered system turn's ids (chat_request -> tokenized_request);
# never reaches a scheduler.
SYSTEM_IDS_KEY = "__streaming_sink_system_ids"
_capped_logged = False


def tokenized_request(original, tm, obj, input_text, input_ids, *args, **kwargs):
    """AROUND ``TokenizerManager._create_tokenized_object(obj, input_text, input_ids, ...)``."""
    settings = sink_config.settings_of(tm.server_args)
    params = getattr(obj, "sampling_params", None)
    custom = params.get("custom_params") if isinstance(params, dict) else None
    policy = sink_config.policy_of(tm.server_args)
    if policy is None or not isinstance(custom, dict) or not (FIELD in custom or SYSTEM_IDS_KEY in custom):
        return original(tm, obj, input_text, input_ids, *args, **kwargs)
    custom = dict(custom)
    system_ids = custom.pop(SYSTEM_IDS_KEY, None)
    cap = max_sink_tokens(settings)
    if custom.get(FIELD) is not None or not system_mode(settings) or system_ids is None or input_ids is None:
        sink_tokens = request_sink_tokens(custom.get(FIELD), policy.sink_tokens, cap)  # 400 if bad
    else:
        sink_tokens = _system_sinks(list(input_ids), system_ids, cap)
    custom[FIELD] = sink_tokens
    obj.sampling_params = {**params, "custom_params": custom}
    result = original(tm, obj, input_text, input_ids, *args, **kwargs)
    result.extra_key = salted(result.extra_key, sink_tokens, policy.sink_tokens)
    return result


def _system_sinks(prompt_ids: list[int], system_ids, cap: int) -> int:
    global _capped_logged
    turn = system_turn_tokens(prompt_ids, [int(t) for t in system_ids])
    sink_tokens = capped(turn, cap)
    if sink_tokens < turn and not _capped_logged:
        _capped_logged = True
        logger.warning("streaming-sink: a system turn of %d tokens is longer than --max-sink-tokens %d: "
                       "its first %d tokens are pinned (logged once)", turn, cap, cap)
    return sink_tokens


def chat_request(original, serving, request, *args, **kwargs):
    """AROUND ``OpenAIServingChat._convert_to_internal_request(request, raw_request)``."""
    settings = sink_config.settings_of(serving.tokenizer_manager.server_args)
    own = request.custom_params.get(FIELD) if isinstance(request.custom_params, dict) else None
    leading = _leading_system(request.messages)
    if not system_mode(settings) or own is not None or not leading or request.input_ids is not None:
        return original(serving, request, *args, **kwargs)
    system_only = request.model_copy(deep=True)  # before the original edits the request
    adapted, processed = original(serving, request, *args, **kwargs)
    system_only.messages = leading
    system_only.continue_final_message = False
    system_only._format_add_generation_prompt = False  # the system turn alone, as it starts the prompt
    try:
        rendered = serving._process_messages(
            system_only, serving.tokenizer_manager.model_config.is_multimodal).prompt_ids
    except Exception as e:  # noqa: BLE001 (a template may refuse a lone system message)
        logger.info("streaming-sink: the chat template cannot render the system message alone (%s: %s); "
                    "this request gets the fallback --sink-tokens", type(e).__name__, e)
        return adapted, processed
    if isinstance(rendered, str):
        rendered = serving.tokenizer_manager.tokenizer.encode(rendered)
    sampling = dict(adapted.sampling_params or {})
    sampling["custom_params"] = {**(sampling.get("custom_params") or {}), SYSTEM_IDS_KEY: list(rendered)}
    adapted.sampling_params = sampling
    return adapted, processed


def _leading_system(messages) -> list:
    """The system message(s) a conversation starts with."""
    leading = []
    for message in messages or ():
        if getattr(message, "role", None) != "system":
            break
        leading.append(message)
    return leading
