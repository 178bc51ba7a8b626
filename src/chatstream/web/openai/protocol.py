"""The OpenAI chat-completions wire: request schema, parameter table, errors, and the mapping to
:class:`SamplingParams`. Behaviour follows OpenAI's where the two can differ:

- Errors are ``{"error": {"message", "type", "param", "code"}}``. A parameter this server cannot
  honour (``n`` > 1, tools, logprobs, JSON mode, penalties, ...) is a 400 naming it, never
  silently ignored; an unknown parameter is a 400 too.
- Messages are never dropped to fit: a prompt plus ``max_tokens`` beyond the context is a 400
  ``context_length_exceeded``. ``max_tokens`` defaults to the server's ``max_new_tokens``
  (shortened to what the context leaves); a larger one is clamped to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from ...engine import SamplingParams
from ...errors import InvalidParams
from ...service.sampling import SamplingLimits
from ...service.sampling import to_sampling_params as sampling_params
from ..json_body import BadJSON, parse_json_body

_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64


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


class ChatMessage(BaseModel):
    """One message of ``messages``. Tool and function messages are not supported."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None


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
    # Accepted and ignored: they change nothing about the reply.
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    parallel_tool_calls: bool | None = None
    # Accepted only with the value that asks for nothing extra (checked in _check_supported).
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
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
    ("n", lambda v: v not in (None, 1), "more than one choice (n > 1)"),
    ("tools", lambda v: bool(v), "tool calling"),
    ("tool_choice", lambda v: v not in (None, "none"), "tool calling"),
    ("functions", lambda v: bool(v), "function calling"),
    ("function_call", lambda v: v not in (None, "none"), "function calling"),
    ("logprobs", lambda v: bool(v), "log probabilities"),
    ("top_logprobs", lambda v: v not in (None, 0), "log probabilities"),
    ("frequency_penalty", lambda v: v not in (None, 0), "a frequency penalty (use repetition_penalty)"),
    ("presence_penalty", lambda v: v not in (None, 0), "a presence penalty (use repetition_penalty)"),
    ("logit_bias", lambda v: bool(v), "logit bias"),
    ("response_format", lambda v: v is not None and v.get("type") != "text", "a response format other than text"),
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
_UNSUPPORTED_MESSAGE_FIELDS = {"tool_calls": "tool calls", "function_call": "function calls",
                               "audio": "audio", "tool_call_id": "tool messages"}


def parse_chat_completion_request(body: bytes, max_messages: int) -> ChatCompletionRequest:
    """Validate a request body; raise :class:`OpenAIError` (400) naming the offending parameter.

    The JSON is parsed strictly first (bounded nesting, no NaN, no lone surrogates) and the
    message count checked before the schema walks every message.
    """
    try:
        data = parse_json_body(body)
    except BadJSON as exc:
        raise OpenAIError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise OpenAIError(400, f"Invalid 'messages': {len(messages)} messages; this server accepts at most {max_messages}.",
                          param="messages", code="too_many_messages")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_supported(request)
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
    if loc.endswith(".role") and error.get("input") in ("tool", "function"):
        return _unsupported(loc, f"messages with role '{error['input']}' (tool calling)")
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
    for param, refused, what in _UNSUPPORTED:
        if refused(getattr(request, param)):
            raise _unsupported(param, what)
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


def _check_message(i: int, message: ChatMessage) -> None:
    for field, value in (message.model_extra or {}).items():
        if field in _IGNORED_MESSAGE_FIELDS or value in (None, [], {}):
            continue
        if field in _UNSUPPORTED_MESSAGE_FIELDS:
            raise _unsupported(f"messages[{i}].{field}", _UNSUPPORTED_MESSAGE_FIELDS[field])
        raise OpenAIError(400, f"Unrecognized argument in messages[{i}]: {field}",
                          param=f"messages[{i}].{field}", code="unknown_parameter")
    if message.content is None:
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


def plain_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """``{"role", "content"}`` dicts as :class:`ChatPrompt` renders them (``developer`` is ``system``)."""
    out = []
    for message in request.messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text or "" for part in content)
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    return out


# The request's sampling fields under the engine's names (the parameter table of this wire).
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop"}


def to_sampling_params(request: ChatCompletionRequest, defaults: SamplingParams, limits: SamplingLimits) -> SamplingParams:
    """The request's :class:`SamplingParams`: unset fields take the server's defaults, ``max_tokens``
    above the server's limit is clamped (the reply then ends with ``finish_reason: length``)."""
    values = {engine: getattr(request, wire) for wire, engine in _SAMPLING_FIELDS.items()
              if getattr(request, wire) is not None}
    name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    asked = request.max_completion_tokens or request.max_tokens
    values["max_new_tokens"] = asked if asked is not None else limits.max_new_tokens
    wire_names = {engine: wire for wire, engine in _SAMPLING_FIELDS.items()} | {"max_new_tokens": name}
    try:
        return sampling_params(defaults, limits, values, wire_names)
    except InvalidParams as exc:
        raise OpenAIError(400, f"Invalid value for {exc.message}.", param=exc.param, code="invalid_value") from None
