"""The OpenAI chat-completions wire: request schema, parameter table, errors, and the mapping to
:class:`SamplingParams`. Behaviour follows OpenAI's where the two can differ:

- Errors are ``{"error": {"message", "type", "param", "code"}}``. A parameter this server cannot
  honour (``n`` > 1, logprobs, audio, ...) is a 400 naming it, never silently ignored; an unknown
  parameter is a 400 too.
- ``tools`` go through the chat template and calls come back as ``tool_calls`` (see ``tools.py``);
  ``response_format`` and a forced ``tool_choice`` become a grammar the engine enforces.
- Messages are never dropped to fit: a prompt plus ``max_tokens`` beyond the context is a 400
  ``context_length_exceeded``. ``max_tokens`` defaults to the server's ``max_new_tokens``
  (shortened to what the context leaves); a larger one is clamped to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from ...engine import SamplingParams
from ...errors import InvalidParams
from ...service.sampling import SamplingLimits
from ...service.sampling import to_sampling_params as sampling_params
from ...service.structured import response_format_values, tool_call_values
from ..json_body import BadJSON, parse_json_body

_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64
MAX_CHOICES = 8  # n: each choice is a generation of its own, taking a slot


# -- errors ----------------------------------------------------------------------------------

class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def _unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(400, f"Unsupported parameter '{param}': this server does not support {what}.",
                       param=param, code="unsupported_parameter")


# -- request schema --------------------------------------------------------------------------

class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class _CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A call the assistant made earlier, sent back in the history."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: _CalledFunction


class ChatMessage(BaseModel):
    """One message of ``messages`` (``function`` messages, OpenAI's deprecated form, are not supported)."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """One of ``tools``: only function tools exist here."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; there is nothing to obfuscate


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``; JSON types are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_INT64_MIN, lt=_UINT64_END)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions that vLLM and others accept as well.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    # Accepted and ignored: they change nothing about the reply.
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    parallel_tool_calls: bool | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # Accepted only with the value that asks for nothing extra (checked in _check_supported).
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None


# (parameter, is the value something we cannot do?, what it asks for)
_UNSUPPORTED: list[tuple[str, Callable[[Any], bool], str]] = [
    ("n", lambda v: v is not None and v > MAX_CHOICES, f"more than {MAX_CHOICES} choices"),
    ("functions", lambda v: bool(v), "the deprecated 'functions' (use 'tools')"),
    ("function_call", lambda v: v not in (None, "none"), "the deprecated 'function_call' (use 'tool_choice')"),
    ("modalities", lambda v: v is not None and set(v) != {"text"}, "an output modality other than text"),
    ("store", lambda v: bool(v), "storing completions"),
    ("audio", lambda v: v is not None, "audio output"),
    ("prediction", lambda v: v is not None, "predicted outputs"),
    ("reasoning_effort", lambda v: v is not None, "reasoning effort"),
    ("verbosity", lambda v: v is not None, "verbosity"),
    ("web_search_options", lambda v: v is not None, "web search"),
    ("moderation", lambda v: v is not None, "moderation"),
    ("prompt_cache_options", lambda v: v is not None, "prompt cache options"),
]
_IGNORED_MESSAGE_FIELDS = {"refusal", "annotations"}  # what clients echo back from a reply
_UNSUPPORTED_MESSAGE_FIELDS = {"function_call": "the deprecated 'function_call' (use 'tool_calls')",
                               "audio": "audio"}


def parse_chat_completion_request(body: bytes, max_messages: int) -> ChatCompletionRequest:
    """Validate a request body; raise :class:`OpenAIError` (400) naming the offending parameter.

    The JSON is parsed strictly first (bounded nesting, no NaN, no lone surrogates) and the
    message count checked before the schema walks every message.
    """
    data = json_object(body)
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise OpenAIError(400, f"Invalid 'messages': {len(messages)} messages; this server accepts at most {max_messages}.",
                          param="messages", code="too_many_messages")
    request = validated(ChatCompletionRequest, data, _UNSUPPORTED)
    _check_supported(request)
    return request


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, parsed strictly (bounded nesting, no NaN, no lone surrogates),
    or a 400 ``invalid_json``."""
    try:
        data = parse_json_body(body)
    except BadJSON as exc:
        raise OpenAIError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


Refusals = Sequence[tuple[str, Callable[[Any], bool], str]]
RequestT = TypeVar("RequestT", bound=BaseModel)


def validated(model: type[RequestT], data: dict[str, Any], refused: Refusals) -> RequestT:
    """``data`` as a ``model``, or a 400 naming the first bad field or the first field that is
    set to something this server refuses (``(field, is_refused, what it would ask for)``)."""
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    for param, is_refused, what in refused:
        if is_refused(getattr(request, param)):
            raise _unsupported(param, what)
    return request


def _validation_error(exc: ValidationError) -> OpenAIError:
    error = exc.errors(include_url=False)[0]
    kind, loc = error["type"], _param_of(error["loc"])
    if kind == "json_invalid":
        return OpenAIError(400, f"We could not parse the JSON body of your request: {error['msg']}.",
                           code="invalid_json")
    if kind == "model_type" and not loc:
        return OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {loc}", param=loc,
                           code="unknown_parameter")
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{loc}'.", param=loc,
                           code="missing_required_parameter")
    if loc.endswith(".role") and error.get("input") == "function":
        return _unsupported(loc, "messages with the deprecated role 'function' (use 'tool')")
    message = str(error["msg"]).removeprefix("Value error, ")
    union = next((p for p in error["loc"] if p in _UNION_BRANCHES), None)
    if union is not None and union != "_ContentPart":  # the value fits no branch: name them all
        message = _UNION_MESSAGES.get(loc.rsplit(".", 1)[-1], message)
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return OpenAIError(400, f"Invalid value for '{loc}': {message}.", param=loc, code=code)


_UNION_BRANCHES = {"str", "list[str]", "list[_ContentPart]", "_ContentPart"}  # tags pydantic adds to locs
_UNION_MESSAGES = {
    "stop": "expected a string or a list of strings",
    "content": "expected a string or a list of content parts like {\"type\": \"text\", \"text\": \"...\"}",
}


def _param_of(loc: tuple[Any, ...]) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _UNION_BRANCHES:
            out += f".{part}" if out else str(part)
    return out


def _check_supported(request: ChatCompletionRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise OpenAIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options", code="invalid_value")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise OpenAIError(400, "Give 'max_completion_tokens' or 'max_tokens', not both with different values.",
                          param="max_tokens", code="invalid_value")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > 16 or not all(stops):
        raise OpenAIError(400, "Invalid value for 'stop': give at most 16 non-empty strings.",
                          param="stop", code="invalid_value")
    for i, message in enumerate(request.messages):
        _check_message(i, message)
    _check_tool_choice(request)
    if request.top_logprobs and not request.logprobs:
        raise OpenAIError(400, "Invalid value for 'top_logprobs': it requires 'logprobs' to be true.",
                          param="top_logprobs", code="invalid_value")
    for token in request.logit_bias or {}:
        if not token.isdigit() or len(token) > 9:
            raise OpenAIError(400, f"Invalid value for 'logit_bias': the key {token!r} is not a token id.",
                              param="logit_bias", code="invalid_value")


def _check_tool_choice(request: ChatCompletionRequest) -> None:
    choice = request.tool_choice
    if choice is None:
        return
    names = [t.function.name for t in request.tools or []]
    if not names and choice != "none":
        raise OpenAIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are given.",
                          param="tool_choice", code="invalid_value")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise OpenAIError(400, "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                              param="tool_choice", code="invalid_value")
        return
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise OpenAIError(400, "Invalid value for 'tool_choice': expected {\"type\": \"function\", "
                          "\"function\": {\"name\": ...}}.", param="tool_choice", code="invalid_value")
    if name not in names:
        raise OpenAIError(400, f"Invalid value for 'tool_choice': no tool named {name!r} is in 'tools'.",
                          param="tool_choice.function.name", code="invalid_value")


def forced_functions(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The functions one of which the reply must call (``tool_choice`` required or named); else none."""
    choice, tools = request.tool_choice, request.tools or []
    if choice == "required":
        return [t.function.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return [t.function.model_dump(exclude_none=True) for t in tools if t.function.name == name]
    return []


def offered_tools(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The tools the prompt describes (none with ``tool_choice: none``)."""
    if request.tool_choice == "none":
        return []
    return [t.model_dump(exclude_none=True) for t in request.tools or []]


def _check_message(i: int, message: ChatMessage) -> None:
    for field, value in (message.model_extra or {}).items():
        if field in _IGNORED_MESSAGE_FIELDS or value in (None, [], {}):
            continue
        if field in _UNSUPPORTED_MESSAGE_FIELDS:
            raise _unsupported(f"messages[{i}].{field}", _UNSUPPORTED_MESSAGE_FIELDS[field])
        raise OpenAIError(400, f"Unrecognized argument in messages[{i}]: {field}",
                          param=f"messages[{i}].{field}", code="unknown_parameter")
    if message.role == "tool" and not message.tool_call_id:
        raise OpenAIError(400, f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                          param=f"messages[{i}].tool_call_id", code="missing_required_parameter")
    if message.tool_calls and message.role != "assistant":
        raise OpenAIError(400, f"Invalid value for 'messages[{i}].tool_calls': only assistant messages have them.",
                          param=f"messages[{i}].tool_calls", code="invalid_value")
    if message.content is None and not message.tool_calls:
        raise OpenAIError(400, f"Missing required parameter: 'messages[{i}].content'.",
                          param=f"messages[{i}].content", code="missing_required_parameter")
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if part.type != "text":
                raise _unsupported(f"{param}.type", f"content of type '{part.type}' (only 'text')")
            if part.text is None:
                raise OpenAIError(400, f"Missing required parameter: '{param}.text'.",
                                  param=f"{param}.text", code="missing_required_parameter")


def plain_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """``{"role", "content"}`` dicts as :class:`ChatPrompt` renders them (``developer`` is ``system``),
    with ``tool_calls`` and ``tool_call_id`` where the message has them."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text or "" for part in content)
        plain: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": content or ""}
        if message.tool_calls:
            plain["tool_calls"] = [c.model_dump() for c in message.tool_calls]
        if message.tool_call_id:
            plain["tool_call_id"] = message.tool_call_id
        out.append(plain)
    return out


# The request's sampling fields under the engine's names (the parameter table of this wire).
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop", "min_p": "min_p",
                    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def to_sampling_params(request: ChatCompletionRequest, defaults: SamplingParams, limits: SamplingLimits) -> SamplingParams:
    """The request's :class:`SamplingParams`: unset fields take the server's defaults, ``max_tokens``
    above the server's limit is clamped (the reply then ends with ``finish_reason: length``)."""
    values = {engine: getattr(request, wire) for wire, engine in _SAMPLING_FIELDS.items()
              if getattr(request, wire) is not None}
    name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    asked = request.max_completion_tokens or request.max_tokens
    values["max_new_tokens"] = asked if asked is not None else limits.max_new_tokens
    wire_names = {engine: wire for wire, engine in _SAMPLING_FIELDS.items()} | {"max_new_tokens": name}
    if request.logprobs:
        values["logprobs"] = request.top_logprobs or 0
    if request.logit_bias:
        values["logit_bias"] = tuple((int(t), b) for t, b in request.logit_bias.items())
        wire_names["logit_bias"] = "logit_bias"
    try:
        forced = forced_functions(request)
        values.update(tool_call_values(forced) if forced else response_format_values(request.response_format))
        if limits.vocab_size and any(t >= limits.vocab_size for t, _ in values.get("logit_bias", ())):
            raise InvalidParams(f"'logit_bias' has a token id beyond the vocabulary ({limits.vocab_size})",
                                param="logit_bias")
        return sampling_params(defaults, limits, values, wire_names)
    except InvalidParams as exc:
        raise OpenAIError(400, f"Invalid value for {exc.message}.", param=exc.param, code="invalid_value") from None
