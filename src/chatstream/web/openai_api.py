"""OpenAI-compatible API: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``.

Stateless (the conversation comes in ``messages``; no session is read or written) and under the
same load control as ``/chat_stream``: one admission queue and one engine, whichever face a
request comes through. Behaviour follows OpenAI's where the two can differ:

- Errors are ``{"error": {"message", "type", "param", "code"}}``. A parameter this server cannot
  honour (``n`` > 1, tools, logprobs, JSON mode, penalties, ...) is a 400 naming it, never
  silently ignored; an unknown parameter is a 400 too.
- ``model`` must be the served model's name (see ``GET /v1/models``), else 404
  ``model_not_found``, as OpenAI and vLLM answer; it may be left out.
- Messages are never dropped to fit: a prompt plus ``max_tokens`` beyond the context is a 400
  ``context_length_exceeded``. ``max_tokens`` defaults to the server's ``max_new_tokens``
  (shortened to what the context leaves) and may not exceed it.
- Overload is 503 with ``Retry-After`` (the official clients wait and retry by themselves).
- A client that disconnects, streaming or not, cancels its generation (or leaves the queue).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..admission import QueueFullError, Ticket
from ..engine import GenerationOutput, GenerationStream, InvalidSamplingParams, SamplingParams
from .responses import wait_for_disconnect

if TYPE_CHECKING:
    from .chat_stream import ChatStream

logger = logging.getLogger("chatstream.openai")

MAX_BODY_BYTES = 4 * 1024 * 1024
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


def parse_chat_completion_request(body: bytes) -> ChatCompletionRequest:
    """Validate a request body; raise :class:`OpenAIError` (400) naming the offending parameter."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
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


def _plain_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """``{"role", "content"}`` dicts as :class:`ChatPrompt` renders them (``developer`` is ``system``)."""
    out = []
    for message in request.messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text or "" for part in content)
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    return out


# -- routes ----------------------------------------------------------------------------------

def add_openai_routes(app: Any, chat_stream: "ChatStream", api_key: str | None = None) -> None:
    """Add ``/v1/chat/completions`` and ``/v1/models`` to a Starlette/FastAPI ``app``.

    They share ``chat_stream``'s engine and admission queue with ``/chat_stream``. With
    ``api_key``, every one of them requires ``Authorization: Bearer <api_key>``.
    """
    api = OpenAIRoutes(chat_stream, api_key=api_key)
    app.add_route("/v1/chat/completions", api.handle_chat_completions, methods=["POST"])
    app.add_route("/v1/models", api.handle_models, methods=["GET"])
    app.add_route("/v1/models/{model:path}", api.handle_model, methods=["GET"])


class OpenAIRoutes:
    """The OpenAI-compatible endpoints over one :class:`ChatStream`; see :func:`add_openai_routes`."""

    def __init__(self, chat_stream: "ChatStream", api_key: str | None = None) -> None:
        self.chat_stream = chat_stream
        self.api_key = api_key or None
        self.created = int(time.time())

    async def handle_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except OpenAIError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def handle_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_model(request.path_params["model"], param=None)
        except OpenAIError as exc:
            return exc.response()
        return JSONResponse(self._model_card())

    async def handle_chat_completions(self, request: Request) -> Any:
        cs = self.chat_stream
        try:
            self._authorize(request)
            await cs.start_queue_worker()
            body = await _read_body(request)
            parsed = parse_chat_completion_request(body)
            self._check_model(parsed.model, param="model")
            self._check_ready()
            prompt_ids = await asyncio.to_thread(self._render, _plain_messages(parsed))
            params = self._sampling_params(parsed, len(prompt_ids))
            ticket = cs.admission.try_enter()
        except OpenAIError as exc:
            return exc.response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        except QueueFullError as exc:
            return OpenAIError(
                503, "The server is overloaded: all generation slots and the wait queue are full. Retry later.",
                type="server_error", code="too_many_requests", headers={"Retry-After": str(exc.retry_after)},
            ).response()
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return _ChatCompletion(
            cs, ticket, prompt_ids, params, model=cs.model_name,
            stream=bool(parsed.stream), include_usage=include_usage,
        )

    # -- helpers --
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.chat_stream.model_name, "object": "model", "created": self.created,
                "owned_by": "chatstream"}

    def _check_model(self, model: str | None, param: str | None) -> None:
        if model is not None and model != self.chat_stream.model_name:
            raise OpenAIError(
                404, f"The model `{model}` does not exist. This server serves `{self.chat_stream.model_name}`.",
                param=param, code="model_not_found",
            )

    def _check_ready(self) -> None:
        cs = self.chat_stream
        if cs.ready:
            return
        if cs.load_error:
            raise OpenAIError(503, f"The model failed to load: {cs.load_error}", type="server_error",
                              code="model_unavailable")
        raise OpenAIError(503, "The model is still loading; retry shortly.", type="server_error",
                          code="model_loading", headers={"Retry-After": "5"})

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of the whole conversation (runs in a thread: tokenizing is slow)."""
        cs = self.chat_stream
        prompt = cs.chat_prompt_clazz(tokenizer=cs.tokenizer)
        try:
            text = prompt.render(messages, add_generation_prompt=True)
        except Exception as exc:  # e.g. a chat template that refuses this order of roles
            raise OpenAIError(400, f"The messages cannot be rendered with the model's chat template: {exc}",
                              param="messages", code="invalid_value") from None
        return list(cs.tokenizer.encode(text, add_special_tokens=False))

    def _sampling_params(self, request: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        cs = self.chat_stream
        defaults = cs.default_params
        limit = defaults.max_new_tokens
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        asked = request.max_completion_tokens or request.max_tokens
        room = cs.context_len - prompt_tokens
        if asked is not None and asked > limit:
            raise OpenAIError(
                400, f"{name} is too large: {asked}. This model supports at most {limit} completion tokens, "
                f"whereas you provided {asked}.", param=name, code="invalid_value",
            )
        if asked is None and room < 1 or asked is not None and asked > room:
            requested = f"However, your messages resulted in {prompt_tokens} tokens" if asked is None else (
                f"However, you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the messages, "
                f"{asked} in the completion)")
            raise OpenAIError(
                400, f"This model's maximum context length is {cs.context_len} tokens. {requested}. "
                "Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded",
            )
        try:
            return SamplingParams(
                max_new_tokens=asked or min(limit, room),
                temperature=defaults.temperature if request.temperature is None else request.temperature,
                top_p=defaults.top_p if request.top_p is None else request.top_p,
                top_k=defaults.top_k if request.top_k is None else request.top_k,
                repetition_penalty=(defaults.repetition_penalty if request.repetition_penalty is None
                                    else request.repetition_penalty),
                seed=request.seed,
                stop=(request.stop,) if isinstance(request.stop, str) else tuple(request.stop or defaults.stop),
            )
        except InvalidSamplingParams as exc:
            param = "max_tokens" if exc.param == "max_new_tokens" else exc.param
            raise OpenAIError(400, f"Invalid value for '{param}': {exc}", param=param, code="invalid_value") from None


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> OpenAIError:
    return OpenAIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large")


# -- answering one admitted request ------------------------------------------------------------

class _ChatCompletion:
    """The ASGI response for one admitted request: waits for its slot, generates, answers.

    It listens for ``http.disconnect`` the whole time, streaming or not: a client that leaves
    takes its request out of the queue or out of the engine at once. The slot is released in
    one ``finally``.
    """

    def __init__(
        self,
        chat_stream: "ChatStream",
        ticket: Ticket,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        model: str,
        stream: bool,
        include_usage: bool,
    ) -> None:
        self.chat_stream = chat_stream
        self.ticket = ticket
        self.prompt_ids = prompt_ids
        self.params = params
        self.model = model
        self.stream = stream
        self.include_usage = include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._generation: GenerationStream | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = asyncio.create_task(self._answer_streaming(send) if self.stream else self._answer_whole(send))
        listener = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait({answer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            answer.cancel()  # a no-op once answered; otherwise the client left (or the server stops)
            if self._generation is not None:
                self._generation.cancel()
            self.ticket.release()
            await asyncio.wait({answer})

    async def _generate(self, on_queued: Callable[[int], Any] | None = None) -> Any:
        await self.ticket.wait(on_queued)
        assert self.chat_stream.engine is not None
        self._generation = self.chat_stream.engine.generate(self.prompt_ids, self.params, request_id=self.id)
        return self._generation

    async def _answer_whole(self, send: Send) -> None:
        text: list[str] = []
        final: GenerationOutput | None = None
        try:
            async for output in await self._generate():
                text.append(output.text)
                if output.finished:
                    final = output
        except Exception:
            logger.exception("chat completion failed")
        if final is None or final.finish_reason not in ("stop", "length"):
            error = _failure(final)
            await _send_json(send, error.status, error.body)
            return
        await _send_json(send, 200, {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                "logprobs": None,
                "finish_reason": final.finish_reason,
            }],
            "usage": self._usage(final),
        })

    async def _answer_streaming(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]})

        async def write(data: str) -> None:
            await send({"type": "http.response.body", "body": data.encode(), "more_body": True})

        async def on_queued(position: int) -> None:
            await write(f": queued, position {position}\n\n")  # an SSE comment: clients skip it

        final: GenerationOutput | None = None
        try:
            generation = await self._generate(on_queued)
            await write(self._chunk({"role": "assistant", "content": ""}))
            async for output in generation:
                if output.text:
                    await write(self._chunk({"content": output.text}))
                if output.finished:
                    final = output
        except Exception:
            logger.exception("chat completion failed")
        if final is not None and final.finish_reason in ("stop", "length"):
            await write(self._chunk({}, finish_reason=final.finish_reason))
            if self.include_usage:
                await write(_sse({**self._chunk_head(), "choices": [], "usage": self._usage(final)}))
            await write("data: [DONE]\n\n")
        else:
            await write(_sse(_failure(final).body))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _chunk_head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {**self._chunk_head(), "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]}
        if self.include_usage:
            chunk["usage"] = None
        return _sse(chunk)

    def _usage(self, final: GenerationOutput) -> dict[str, int]:
        prompt = final.prompt_tokens or len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": final.completion_tokens,
                "total_tokens": prompt + final.completion_tokens}


def _failure(final: GenerationOutput | None) -> OpenAIError:
    if final is not None and final.finish_reason == "cancelled":
        return OpenAIError(503, "The generation was cancelled by the server (it may be shutting down).",
                           type="server_error", code="cancelled")
    detail = final.error if final is not None and final.error else "an unexpected error occurred"
    return OpenAIError(500, f"The generation failed: {detail}", type="server_error", code="generation_failed")


async def _send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
    ]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
