"""The OpenAI wire's shared parts: errors, strict request validation, the fields every request
shares with their bounds, the one mapping to :class:`SamplingParams`, and the chat-completions
request itself. Behaviour follows OpenAI's where the two can differ:

- Errors are ``{"error": {"message", "type", "param", "code"}}``. A parameter this server cannot
  honour (``n`` > 8, audio, ...) is a 400 naming it, never silently ignored; an unknown parameter
  is a 400 too.
- When a body has several bad fields, the 400 names the first bad one in the body's own order
  (a missing required field after those), then the first refused value in the model's
  :attr:`~OpenAIRequest.refused` table, then the cross-field rules (:meth:`~OpenAIRequest.check`):
  the order of the class's fields never decides it.
- ``tools`` go through the chat template and calls come back as ``tool_calls`` (see ``tools.py``);
  ``response_format`` and a forced ``tool_choice`` become a grammar the engine enforces.
- Messages are never dropped to fit: a prompt plus ``max_tokens`` beyond the context is a 400
  ``context_length_exceeded``. ``max_tokens`` defaults to the server's ``max_new_tokens``
  (shortened to what the context leaves); a larger one is clamped to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from starlette.responses import JSONResponse

from ...engine import SamplingParams
from ...errors import InvalidParams
from ...service.sampling import SamplingLimits
from ...service.sampling import to_sampling_params as sampling_params
from ...service.structured import check_json_schema, response_format_values, tool_call_values
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


def unsupported(param: str, what: str) -> OpenAIError:
    """The 400 for a value this server cannot honour (never silently ignored)."""
    return OpenAIError(400, f"Unsupported parameter '{param}': this server does not support {what}.",
                       param=param, code="unsupported_parameter")


def invalid_value(exc: InvalidParams) -> OpenAIError:
    """The 400 for a value the service or the grammar engine found out of range."""
    return OpenAIError(400, f"Invalid value for {exc.message}.", param=exc.param, code="invalid_value")


# -- validation ------------------------------------------------------------------------------

Refusals = Sequence[tuple[str, Callable[[Any], bool], str]]
RequestT = TypeVar("RequestT", bound="StrictRequest")


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


def validated(model: type[RequestT], data: dict[str, Any]) -> RequestT:
    """``data`` as a ``model``, or a 400 naming, in this order: the first bad field in the body's
    order, the first field set to something the model's ``refused`` table lists, the first broken
    cross-field rule of its :meth:`~OpenAIRequest.check`."""
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, data) from None
    for param, is_refused, what in model.refused:
        if is_refused(getattr(request, param)):
            raise unsupported(param, what)
    request.check()
    return request


def _validation_error(exc: ValidationError, data: dict[str, Any]) -> OpenAIError:
    errors = exc.errors(include_url=False)
    order = {key: i for i, key in enumerate(data)}

    def rank(error: Any) -> int:  # the field's place in the body; a missing one after all those present
        return order.get(str(error["loc"][0]), len(order)) if error["loc"] else -1

    # The first bad field in the body's order; within it, the error that reaches deepest into the
    # objects the client sent (when a union's branches all fail, the one its value was meant for).
    first = min(map(rank, errors))
    candidates = [(_locate(e["loc"], data, e["type"]), e) for e in errors if rank(e) == first]
    (loc, _, union_level), error = max(candidates, key=lambda c: c[0][1])  # max() keeps the first of ties
    kind = error["type"]
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
        return unsupported(loc, "messages with the deprecated role 'function' (use 'tool')")
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected an object"
    if union_level:  # the value fits none of the field's shapes: name them all
        message = _UNION_MESSAGES.get(loc.rsplit(".", 1)[-1], message)
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return OpenAIError(400, f"Invalid value for '{loc}': {message}.", param=loc, code=code)


_UNION_MESSAGES = {
    "stop": "expected a string or a list of strings",
    "content": "expected a string or a list of content parts like {\"type\": \"text\", \"text\": \"...\"}",
    "input": "expected a string or a list of input items (messages, function_call, function_call_output)",
    "prompt": "expected a string, a list of one string, or a list of token ids",
    "output": "expected a string or a list of content parts",
    "tool_choice": "expected 'none', 'auto', 'required' or an object naming a function",
}


def _locate(loc: tuple[Any, ...], data: Any, kind: str) -> tuple[str, int, bool]:
    """Where an error is, as the client wrote it: ``('messages', 0, 'content', 'str')`` ->
    ``messages[0].content``, found by walking the body (pydantic adds the names of union branches
    to a location: anything the body does not have is one of those). Also returns how many object
    keys the walk went through, and whether the error is the union's own (no branch fits)."""
    if "[key]" in loc:  # a bad key: the object holding it is the field to name
        loc = loc[:loc.index("[key]") - 1]
    out, pending, node, keys, tagged = "", "", data, 0, False
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            pending += f"[{part}]"
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            out += pending + (f".{part}" if out else part)
            pending, node, keys, tagged = "", node[part], keys + 1, False
        elif kind == "missing" and i == len(loc) - 1:
            return out + pending + (f".{part}" if out or pending else str(part)), keys + 1, False
        else:
            tagged = True  # a union branch's name
    return (out if tagged else out + pending), keys, tagged


# -- the fields every request shares ---------------------------------------------------------

_Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                           Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)]


class StrictRequest(BaseModel):
    """A request body: JSON types checked strictly, unknown fields refused (see :func:`validated`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    refused: ClassVar[Refusals] = ()  # (field, is the value something we cannot do?, what it asks for)

    def check(self) -> None:
        """Rules across fields, after the schema and the refusals; raises :class:`OpenAIError`."""


class TokenizeRequest(StrictRequest):
    """The body of vLLM's ``POST /tokenize`` (what a chatstream in front of this one sends)."""

    prompt: str
    model: str | None = None
    add_special_tokens: bool = False


class OpenAIRequest(StrictRequest):
    """What every generation request of the OpenAI wire shares, with one set of bounds, and the
    hooks :func:`to_sampling_params` reads."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    user: str | None = None

    def token_limit(self) -> int | None:
        """The reply's token cap as asked (``None``: the server's default)."""
        return None

    def token_limit_param(self) -> str:
        """The field that caps the reply's tokens, for an error that names it."""
        return "max_tokens"

    def default_token_limit(self, limits: SamplingLimits) -> int:
        return limits.max_new_tokens

    def logprobs_count(self) -> int | None:
        """``None``: no log-probabilities; ``k``: each token's and the ``k`` most likely."""
        return None

    def structured_output(self) -> dict[str, str]:
        """The ``grammar`` the reply must match and the ``response_format`` it was made from (for a
        remote engine), as :class:`SamplingParams` fields; raises :class:`InvalidParams` naming the field."""
        return {}

    def compiles_schemas(self) -> bool:
        """Whether :meth:`structured_output` compiles a JSON schema with llguidance (a grammar, or tools'
        ``parameters`` checked): up to ~130 ms for a large schema, so it runs off the event loop."""
        return False

    @property
    def grammar_param(self) -> str:
        """The field the grammar comes from, for a refusal that names it."""
        return "response_format"


class ServiceFields(BaseModel):
    """Fields the chat and Responses APIs accept that change nothing about the reply here."""

    metadata: _Metadata | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; there is nothing to obfuscate


class _JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: its ``type`` is checked where the grammar is made (shared with ``/chat_stream``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: str
    json_schema: _JsonSchemaFormat | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class SamplingRequest(OpenAIRequest):
    """The sampling fields the chat and the legacy completions wires share (with vLLM's extensions
    ``top_k``, ``repetition_penalty`` and ``min_p``)."""

    refused: ClassVar[Refusals] = (
        ("n", lambda v: v is not None and v > MAX_CHOICES, f"more than {MAX_CHOICES} choices"),
    )

    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_INT64_MIN, lt=_UINT64_END)
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(None, ge=1)

    @field_validator("logit_bias")
    @classmethod
    def _keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token in value or {}:
            if not (token.isascii() and token.isdigit()) or len(token) > 9:
                raise ValueError(f"the key {token!r} is not a token id")
        return value

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options", code="invalid_value")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or not all(stops):
            raise OpenAIError(400, "Invalid value for 'stop': give at most 16 non-empty strings.",
                              param="stop", code="invalid_value")

    def token_limit(self) -> int | None:
        return self.max_tokens

    def structured_output(self) -> dict[str, str]:
        return response_format_values(self.response_format.as_dict() if self.response_format else None)

    def compiles_schemas(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "min_p",
                    "presence_penalty", "frequency_penalty")  # the same names on the wire and in SamplingParams


def to_sampling_params(request: OpenAIRequest, defaults: SamplingParams, limits: SamplingLimits) -> SamplingParams:
    """The request's :class:`SamplingParams`, the same way for every endpoint: unset fields take the
    server's defaults, a token cap above the server's limit is clamped (the reply then ends with
    ``finish_reason: length``); a value out of range is a 400 naming its field."""
    values = {name: value for name in _SAMPLING_FIELDS if (value := getattr(request, name, None)) is not None}
    asked = request.token_limit()
    values["max_new_tokens"] = asked if asked is not None else request.default_token_limit(limits)
    if (logprobs := request.logprobs_count()) is not None:
        values["logprobs"] = logprobs
    bias: dict[str, float] | None = getattr(request, "logit_bias", None)
    try:
        if bias:
            values["logit_bias"] = tuple((int(t), b) for t, b in bias.items())
            if limits.vocab_size and any(int(t) >= limits.vocab_size for t in bias):
                raise InvalidParams(f"'logit_bias' has a token id beyond the vocabulary ({limits.vocab_size})",
                                    param="logit_bias")
        values.update(request.structured_output())
        return sampling_params(defaults, limits, values, {"max_new_tokens": request.token_limit_param()})
    except InvalidParams as exc:
        raise invalid_value(exc) from None


# -- tools -----------------------------------------------------------------------------------

def check_tool_parameters(functions: Sequence[FunctionDefinition], param: str) -> None:
    """Refuse a function whose ``parameters`` is not valid JSON Schema, whatever ``tool_choice``
    is (as OpenAI does): offered with ``auto`` it would otherwise reach the model and be refused only
    when forced. ``param`` is the field's name with ``{}`` for the tool's index. Compiles: off the loop."""
    for i, function in enumerate(functions):
        if function.parameters:
            check_json_schema(function.parameters, param=param.format(i))


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def definition(self) -> dict[str, Any]:
        """The chat wire's ``function`` object."""
        return self.model_dump(exclude_none=True, include={"name", "description", "parameters", "strict"})


def check_tool_choice(choice: str | dict[str, Any] | None, functions: Sequence[FunctionDefinition],
                      *, nested: bool) -> None:
    """``tool_choice`` against the tools given: ``none``, ``auto``, ``required`` or a named function,
    ``{"type": "function", "function": {"name": ...}}`` (chat, ``nested``) or ``{"type": "function",
    "name": ...}`` (Responses)."""
    if choice is None:
        return
    shape = '{"type": "function", "function": {"name": ...}}' if nested else '{"type": "function", "name": ...}'
    if not functions and choice != "none":
        raise OpenAIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are given.",
                          param="tool_choice", code="invalid_value")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise OpenAIError(400, f"Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or {shape}.",
                              param="tool_choice", code="invalid_value")
        return
    name = _chosen_name(choice, nested)
    if choice.get("type") != "function" or not isinstance(name, str) or len(choice) > 2 \
            or (nested and len(choice["function"]) > 1):
        raise OpenAIError(400, f"Invalid value for 'tool_choice': expected {shape}.", param="tool_choice",
                          code="invalid_value")
    if name not in [f.name for f in functions]:
        raise OpenAIError(400, f"Invalid value for 'tool_choice': no tool named {name!r} is in 'tools'.",
                          param="tool_choice.function.name" if nested else "tool_choice.name", code="invalid_value")


def _chosen_name(choice: dict[str, Any], nested: bool) -> Any:
    if not nested:
        return choice.get("name")
    function = choice.get("function")
    return function.get("name") if isinstance(function, dict) else None


def forced_functions(choice: str | dict[str, Any] | None, functions: Sequence[FunctionDefinition],
                     *, nested: bool) -> list[dict[str, Any]]:
    """The functions one of which the reply must call (``tool_choice`` required or named); else none."""
    if choice == "required":
        return [f.definition() for f in functions]
    if isinstance(choice, dict):
        name = _chosen_name(choice, nested)
        return [f.definition() for f in functions if f.name == name]
    return []


# -- the chat-completions request ------------------------------------------------------------

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
    content: str | Annotated[list[_ContentPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = None


class ToolDefinition(BaseModel):
    """One of ``tools``: only function tools exist here."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(SamplingRequest, ServiceFields):
    """The body of ``POST /v1/chat/completions``."""

    refused: ClassVar[Refusals] = (
        *SamplingRequest.refused,
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
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    # Accepted and ignored: they change nothing about the reply.
    prompt_cache_retention: str | None = None
    # Accepted only with the value that asks for nothing extra (the refused table).
    modalities: list[str] | None = None
    store: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None

    def check(self) -> None:
        super().check()
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise OpenAIError(400, "Give 'max_completion_tokens' or 'max_tokens', not both with different values.",
                              param="max_tokens", code="invalid_value")
        for i, message in enumerate(self.messages):
            _check_message(i, message)
        check_tool_choice(self.tool_choice, self.functions_offered(), nested=True)
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError(400, "Invalid value for 'top_logprobs': it requires 'logprobs' to be true.",
                              param="top_logprobs", code="invalid_value")

    def functions_offered(self) -> list[FunctionDefinition]:
        return [t.function for t in self.tools or []]

    def token_limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def forced_functions(self) -> list[dict[str, Any]]:
        """The functions one of which the reply must call (``tool_choice`` required or named); else none."""
        return forced_functions(self.tool_choice, self.functions_offered(), nested=True)

    def structured_output(self) -> dict[str, str]:
        forced = self.forced_functions()
        values = tool_call_values(forced) if forced else {}  # a forced schema that cannot compile: tool_choice
        check_tool_parameters(self.functions_offered(), "tools[{}].function.parameters")  # every tool, offered or forced
        return values if forced else super().structured_output()

    def compiles_schemas(self) -> bool:
        return bool(self.forced_functions()) or any(f.parameters for f in self.functions_offered()) \
            or super().compiles_schemas()

    @property
    def grammar_param(self) -> str:
        return "tool_choice" if self.forced_functions() else "response_format"


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
    return validated(ChatCompletionRequest, data)


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
            raise unsupported(f"messages[{i}].{field}", _UNSUPPORTED_MESSAGE_FIELDS[field])
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
                raise unsupported(f"{param}.type", f"content of type '{part.type}' (only 'text')")
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
