"""Touch point 9: per-request sink lengths (the rules: vllm_sink/request_sinks.py).

Front end: ``InputProcessor.process_inputs`` validates ``extra_args["sink_tokens"]`` (a 400
naming the field) and stamps S and the salted ``cache_salt`` on the engine request;
``OpenAIServingChat.render_chat_request``, in ``--sink-tokens system`` mode, sets S to the
rendered system turn's length. Scheduler: ``KVCacheManager.get_computed_blocks`` /
``allocate_slots`` tell the policy's managers each request's S (and the hit lookup, a
classmethod, through ``kv_manager.LOOKUP_SINK_TOKENS``); ``__init__`` hands them the admission
inputs. Worker: ``GPUModelRunner._prepare_inputs`` (V1 runner; CPU's subclasses it) fills
each row's and token's S before the step's metadata and forward. Runner choice:
``VllmConfig._get_v2_model_runner_unsupported_features`` lists per-request sinks when the
server enables them, so vLLM itself picks the V1 runner (V2 is not hooked) unless the user set
``VLLM_USE_V2_MODEL_RUNNER``.
"""

from __future__ import annotations

import functools
import logging

from streaming_sink import flags as sink_flags

from .. import config as sink_config

logger = logging.getLogger("vllm.streaming_sink")


def _ours(fn):
    """A wrapper made with functools.wraps, named as ours again (so the hook-target check
    sees through it to vLLM's original, ``__wrapped__``)."""
    fn.__module__ = __name__
    return fn


def install() -> None:
    _install_runner_choice()
    _install_request_frontend()
    _install_offline_chat()
    _install_request_scheduler()
    _install_request_worker()


V2_UNSUPPORTED = "streaming-sink's per-request sinks (--sink-tokens system, --max-sink-tokens)"


def _install_runner_choice() -> None:
    """vLLM 0.33 on CUDA defaults to its V2 model runner, which this package does not hook for
    per-request S (its front end would answer each such request with a 400). vLLM's own list
    of what V2 does not support gets per-request sinks when the server enables them, so vLLM
    picks V1 and logs why. An explicit VLLM_USE_V2_MODEL_RUNNER is read before that list and
    wins, as vLLM intends."""
    from vllm.config import VllmConfig

    original = VllmConfig._get_v2_model_runner_unsupported_features

    @_ours
    @functools.wraps(original)
    def _get_v2_model_runner_unsupported_features(self):
        unsupported = original(self)
        if sink_flags.larger_request_sinks(sink_config.settings(self.additional_config)):
            unsupported = [*unsupported, V2_UNSUPPORTED]
        return unsupported

    VllmConfig._get_v2_model_runner_unsupported_features = _get_v2_model_runner_unsupported_features


def _install_request_frontend() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from .. import request_sinks

    original = InputProcessor.process_inputs

    @_ours
    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        opts = sink_config.settings(self.vllm_config.additional_config)
        if opts is None or not isinstance(params, SamplingParams):
            return original(self, request_id, prompt, params, *args, **kwargs)
        s = request_sinks.frontend_sink_tokens(params, opts, bool(self.vllm_config.use_v2_model_runner))
        request = original(self, request_id, prompt, params, *args, **kwargs)
        request_sinks.stamp(request, s, opts)
        return request

    InputProcessor.process_inputs = process_inputs
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    except ImportError:  # a build without the OpenAI server: the offline API only
        return
    original_render = OpenAIServingChat.render_chat_request

    @_ours
    @functools.wraps(original_render)
    async def render_chat_request(self, request):
        result = await original_render(self, request)
        opts = sink_config.settings(self.engine_client.vllm_config.additional_config)
        if sink_flags.system_mode(opts) and isinstance(result, tuple):
            await _system_turn_sinks(self, request, result, opts)
        return result

    OpenAIServingChat.render_chat_request = render_chat_request


def _system_message(messages):
    """The conversation's first message when it is the system turn, else None."""
    first = messages[0] if messages else None
    role = first.get("role") if isinstance(first, dict) else getattr(first, "role", None)
    return first if role == "system" else None


def _system_turn_s(prompt_ids, system_ids, opts) -> int:
    """S for a conversation: its rendered system turn's length (the common prefix of the
    prompt and the system message rendered alone), capped at --max-sink-tokens (logged)."""
    from streaming_sink.request_sinks import capped, system_turn_tokens

    n = system_turn_tokens(prompt_ids or [], system_ids or [])
    cap = sink_flags.max_sink_tokens(opts)
    if n > cap:
        logger.warning("streaming-sink: a system turn of %d tokens is longer than --max-sink-tokens %d: "
                       "its first %d tokens are the request's sinks", n, cap, cap)
    return capped(n, cap)


async def _system_turn_sinks(serving, request, rendered, opts) -> None:
    """`--sink-tokens system` (OpenAI chat endpoint): the request's S is its system turn's
    length (_system_turn_s). A request's own vllm_xargs sink_tokens is honoured; no
    system message: the fallback number (the server default, nothing to set)."""
    from streaming_sink.request_sinks import FIELD

    xargs = request.vllm_xargs or {}
    first = _system_message(request.messages or [])
    if FIELD in xargs or first is None:
        return
    alone = request.model_copy(update={"messages": [first], "add_generation_prompt": False,
                                       "continue_final_message": False})
    system_only = await serving.online_renderer.render_chat(alone)
    if not isinstance(system_only, tuple):  # the template cannot render a system turn alone
        logger.warning("streaming-sink: the chat template did not render the system message alone "
                       "(%s); the request keeps --sink-tokens %d", getattr(system_only, "error", system_only),
                       opts["sink_tokens"])
        return
    prompt_ids = serving._extract_prompt_components(rendered[1][0]).token_ids
    system_ids = serving._extract_prompt_components(system_only[1][0]).token_ids
    request.vllm_xargs = {**xargs, FIELD: _system_turn_s(prompt_ids, system_ids, opts)}


def _install_offline_chat() -> None:
    """``LLM.chat`` in `--sink-tokens system` mode: each conversation's S is its system
    turn's length, as on the chat endpoint. The conversations with a system message (and
    no sink_tokens of their own) are rendered once more here, whole and cut to the
    system message, and get a copy of their SamplingParams carrying S (the caller's
    object is left as it was)."""
    from vllm.entrypoints.common.offline import OfflineInferenceMixin

    original = vars(OfflineInferenceMixin)["_add_chat_requests"]

    @_ours
    @functools.wraps(original)
    def _add_chat_requests(self, messages, params, **kwargs):
        opts = sink_config.settings(self.llm_engine.vllm_config.additional_config)
        if sink_flags.system_mode(opts):
            params = _offline_system_turn_params(self, messages, params, kwargs, opts)
        return original(self, messages, params, **kwargs)

    OfflineInferenceMixin._add_chat_requests = _add_chat_requests


_RENDER_KEYS = ("chat_template", "chat_template_content_format", "chat_template_kwargs", "tools",
                "tokenization_kwargs", "mm_processor_kwargs")


def _offline_system_turn_params(llm, messages, params, kwargs, opts) -> list:
    from vllm.renderers.inputs.preprocess import conversation_to_seq, extract_prompt_components
    from vllm.sampling_params import SamplingParams

    from streaming_sink.request_sinks import FIELD

    conversations = conversation_to_seq(messages)
    per_conversation = list(llm._params_to_seq(params, len(conversations)))
    render = {key: kwargs[key] for key in _RENDER_KEYS if key in kwargs}
    for i, conversation in enumerate(conversations):
        p, first = per_conversation[i], _system_message(conversation)
        if first is None or not isinstance(p, SamplingParams) or FIELD in (p.extra_args or {}):
            continue
        whole = llm._preprocess_chat_one(
            conversation, add_generation_prompt=kwargs.get("add_generation_prompt", True),
            continue_final_message=kwargs.get("continue_final_message", False), **render)
        alone = llm._preprocess_chat_one([first], add_generation_prompt=False, continue_final_message=False,
                                         **render)
        s = _system_turn_s(extract_prompt_components(llm.model_config, whole).token_ids,
                           extract_prompt_components(llm.model_config, alone).token_ids, opts)
        p = p.clone()
        p.extra_args = {**(p.extra_args or {}), FIELD: s}
        per_conversation[i] = p
    return per_conversation


def _install_request_scheduler() -> None:
    import inspect

    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from ..kv_manager import LOOKUP_SINK_TOKENS, StreamingSinkManager
    from ..request_sinks import request_sink_tokens

    original_init = KVCacheManager.__init__
    init_signature = inspect.signature(original_init)

    @_ours
    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._streaming_sink_managers = [m for m in self.coordinator.single_type_managers
                                         if isinstance(m, StreamingSinkManager)]
        in_flight = init_signature.bind(self, *args, **kwargs).arguments.get("max_in_flight_tokens")
        for m in self._streaming_sink_managers:
            m.set_admission_limits(in_flight or self.max_model_len, self.max_model_len)

    def register(manager, request) -> int | None:
        managers = getattr(manager, "_streaming_sink_managers", None)
        if not managers:
            return None
        spec = managers[0].kv_cache_spec
        s = request_sink_tokens(request.sampling_params, spec.sink_tokens,
                                max(spec.sink_tokens, spec.max_sink_tokens))
        for m in managers:
            m.set_request_sinks(request.request_id, s)
        return s

    original_lookup = KVCacheManager.get_computed_blocks

    @_ours
    @functools.wraps(original_lookup)
    def get_computed_blocks(self, request):
        token = LOOKUP_SINK_TOKENS.set(register(self, request))
        try:
            return original_lookup(self, request)
        finally:
            LOOKUP_SINK_TOKENS.reset(token)

    original_allocate = KVCacheManager.allocate_slots

    @_ours
    @functools.wraps(original_allocate)
    def allocate_slots(self, request, *args, **kwargs):
        register(self, request)
        return original_allocate(self, request, *args, **kwargs)

    KVCacheManager.__init__ = __init__
    KVCacheManager.get_computed_blocks = get_computed_blocks
    KVCacheManager.allocate_slots = allocate_slots


def _install_request_worker() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs

    @_ours
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        state = getattr(self, "_streaming_sink_sinks", None)
        if state is not None:  # the batch's rows are in their final order here
            n = self.input_batch.num_reqs
            state.fill(self.input_batch.req_ids[:n], num_scheduled_tokens, self.requests)
        return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    GPUModelRunner._prepare_inputs = _prepare_inputs


def worker_sinks(runner, policy):
    """The V1 runner's per-row / per-token S buffers (request_sinks.WorkerSinks); None for
    the V2 runner (its front end refuses a per-request S: request_sinks.frontend_sink_tokens)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ..request_sinks import WorkerSinks

    if not isinstance(runner, GPUModelRunner):
        return None
    cap = sink_flags.max_sink_tokens(sink_config.settings(runner.vllm_config.additional_config))
    state = WorkerSinks(policy.sink_tokens, cap, runner.max_num_reqs, runner.max_num_tokens, runner.device)
    WorkerSinks.register(runner.vllm_config, state)
    runner._streaming_sink_sinks = state
    return state


def request_sink_targets() -> list:
    """hook_targets() rows of section 9."""
    ip, kvm = "vllm.v1.engine.input_processor:InputProcessor", "vllm.v1.core.kv_cache_manager:KVCacheManager"
    chat, runner = ("vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat",
                    "vllm.v1.worker.gpu_model_runner:GPUModelRunner")
    offline = "vllm.entrypoints.common.offline:OfflineInferenceMixin"
    return [
        # the runner choice (_install_runner_choice): vLLM reads the list when no env var decides
        ("own", "vllm.config:VllmConfig._get_v2_model_runner_unsupported_features", ()),
        ("uses", "vllm.config:VllmConfig.use_v2_model_runner", ("_get_v2_model_runner_unsupported_features",)),
        ("attr", "vllm.config:VllmConfig.additional_config", None),
        ("own", f"{ip}.process_inputs", ("request_id", "prompt", "params", "supported_tasks")),
        ("attr", f"{ip}.vllm_config", None),
        ("attr", "vllm.config:VllmConfig.use_v2_model_runner", None),
        ("attr", "vllm.sampling_params:SamplingParams.extra_args", None),
        ("call", "vllm.exceptions:VLLMValidationError.__init__", ("message", "parameter=", "value=")),
        ("attr", "vllm.v1.engine:EngineCoreRequest.cache_salt", None),
        ("attr", "vllm.v1.engine:EngineCoreRequest.sampling_params", None),
        ("own", f"{chat}.render_chat_request", ("request",)),
        # LLM.chat in system mode (_install_offline_chat)
        ("own", f"{offline}._add_chat_requests", ("messages", "params")),
        ("call", f"{offline}._preprocess_chat_one", (
            "conversation", "chat_template=", "chat_template_content_format=", "chat_template_kwargs=",
            "add_generation_prompt=", "continue_final_message=", "tools=", "tokenization_kwargs=",
            "mm_processor_kwargs=")),
        ("call", f"{offline}._params_to_seq", ("params", "num_requests")),
        ("attr", f"{offline}.llm_engine", None),
        ("attr", f"{offline}.model_config", None),
        ("attr", "vllm.v1.engine.llm_engine:LLMEngine.vllm_config", None),
        ("call", "vllm.renderers.inputs.preprocess:conversation_to_seq", ("conversation_or_conversations",)),
        ("call", "vllm.renderers.inputs.preprocess:extract_prompt_components", ("model_config", "prompt")),
        ("call", "vllm.sampling_params:SamplingParams.clone", ()),
        ("attr", f"{chat}.online_renderer", None),
        ("attr", f"{chat}.engine_client", None),
        ("call", f"{chat}._extract_prompt_components", ("prompt",)),
        ("call", "vllm.renderers.online_renderer:OnlineRenderer.render_chat", ("request",)),
        *(("attr", f"vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.{name}", None)
          for name in ("vllm_xargs", "messages", "add_generation_prompt", "continue_final_message")),
        ("own", f"{kvm}.__init__", ("kv_cache_config", "max_model_len", "scheduler_block_size",
                                    "hash_block_size", "max_in_flight_tokens")),
        ("own", f"{kvm}.get_computed_blocks", ("request",)),
        ("own", f"{kvm}.allocate_slots", ("request", "num_new_tokens")),
        ("attr", f"{kvm}.max_model_len", None),
        ("attr", "vllm.v1.request:Request.sampling_params", None),
        ("attr", "vllm.v1.request:Request.request_id", None),
        ("own", f"{runner}._prepare_inputs", ("scheduler_output", "num_scheduled_tokens")),
        *(("attr", f"{runner}.{name}", None) for name in (
            "input_batch", "requests", "max_num_reqs", "max_num_tokens", "device")),
        ("attr", "vllm.v1.worker.gpu_input_batch:InputBatch.req_ids", None),
        ("attr", "vllm.v1.worker.gpu_input_batch:InputBatch.num_reqs", None),
        ("attr", "vllm.v1.worker.gpu_input_batch:CachedRequestState.sampling_params", None),
    ]
