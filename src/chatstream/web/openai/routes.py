"""The OpenAI-compatible routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``,
and vLLM's ``POST /tokenize`` (so that a chatstream in front of this one counts tokens exactly).

Stateless (the conversation comes in ``messages``; no session is read or written) and under the
same load control as ``/chat_stream``: one :class:`ChatService`, so one admission queue and one
engine, whichever face a request comes through. ``model`` must be the served model's name (see
``GET /v1/models``), else 404 ``model_not_found``; it may be left out. Overload is 503 with
``Retry-After`` (the official clients wait and retry by themselves). A client that disconnects,
streaming or not, cancels its generation (or leaves the queue).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, cast

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ...engine import SamplingParams
from ...errors import ChatError, InvalidRequest, ModelNotReady, PromptTooLong, QueueFull
from ...service import ChatService, Delta, Done, Failed, Queued, Turn, TurnEvent
from ...service.sampling import SamplingLimits
from ..auth import bearer_token
from ..limits import BodyTimeout, BodyTooLarge, read_request_body
from ..streaming import TurnStreamingResponse, wait_for_disconnect, watch_disconnect
from .completions import CompletionRequest, TextCompletion, completion_usage, parse_completion_request, prompt_text
from .protocol import (
    ChatCompletionRequest,
    OpenAIError,
    OpenAIRequest,
    RequestT,
    TokenizeRequest,
    json_object,
    offered_tools,
    parse_chat_completion_request,
    plain_messages,
    to_sampling_params,
    unsupported,
    validated,
)
from .responses import (
    STORE_PREFIX,
    ResponseObject,
    ResponsesRequest,
    StoringTurn,
    chat_tools,
    check_response_id,
    input_messages,
    parse_responses_request,
)
from .tools import (
    ToolCallStream,
    ToolFormat,
    new_call_id,
    parse_forced_call,
    parse_tool_calls,
    template_messages,
    template_supports_tools,
    tool_format,
)

_PARSE_ON_LOOP_BYTES = 64 * 1024  # larger bodies are parsed off the event loop


def add_openai_routes(app: Any, service: Any, api_key: str | None = None) -> None:
    """Add ``/v1/chat/completions`` and ``/v1/models`` to a Starlette/FastAPI ``app``.

    ``service`` is a :class:`ChatService` (or a ``ChatStream``, whose service is used): the routes
    share its engine and admission queue with ``/chat_stream``. With ``api_key``, every one of
    them requires ``Authorization: Bearer <api_key>``.
    """
    api = OpenAIRoutes(getattr(service, "service", service), api_key=api_key)
    app.add_route("/v1/chat/completions", api.handle_chat_completions, methods=["POST"])
    app.add_route("/v1/completions", api.handle_completions, methods=["POST"])
    app.add_route("/v1/responses", api.handle_responses, methods=["POST"])
    app.add_route("/v1/responses/{response_id}", api.handle_stored_response, methods=["GET", "DELETE"])
    app.add_route("/v1/models", api.handle_models, methods=["GET"])
    app.add_route("/v1/models/{model:path}", api.handle_model, methods=["GET"])
    app.add_route("/tokenize", api.handle_tokenize, methods=["POST"])
    # Anything else under /v1 (e.g. /v1/completions, /v1/embeddings) is OpenAI's 404, in its envelope.
    app.add_route("/v1/{rest:path}", api.handle_unknown,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)


class OpenAIRoutes:
    """The OpenAI-compatible endpoints over one :class:`ChatService`; see :func:`add_openai_routes`."""

    def __init__(self, service: ChatService, api_key: str | None = None) -> None:
        self.service = service
        self.api_key = api_key or None
        self.created = int(time.time())

    async def handle_unknown(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except OpenAIError as exc:
            return exc.response()
        return OpenAIError(404, f"Invalid URL ({request.method} {request.url.path}): this server implements "
                                "/v1/chat/completions, /v1/completions, /v1/responses and /v1/models.", code="unknown_url").response()

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
        return JSONResponse({**self._model_card(), "id": request.path_params["model"]})

    async def handle_tokenize(self, request: Request) -> Response:
        """vLLM's ``POST /tokenize``: ``{"prompt": text}`` -> ``{"tokens": [...], "count": n, "max_model_len": n}``."""
        try:
            parsed = await self._parse_body(request, lambda body: validated(TokenizeRequest, json_object(body)),
                                            start=False, lane="tokenize")
            self._check_model(parsed.model, param="model")
            if self.service.tokenizer is None:
                raise OpenAIError(503, "The model is still loading; retry shortly.", type="server_error",
                                  code="model_loading", headers={"Retry-After": "5"})
            tokens = await self.service.run_bounded(lambda: list(self.service.tokenizer.encode(
                parsed.prompt, add_special_tokens=parsed.add_special_tokens)), lane="tokenize")
        except OpenAIError as exc:
            return exc.response()
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.service.context_len})

    async def handle_chat_completions(self, request: Request) -> Any:
        service = self.service
        parsed: ChatCompletionRequest | None = None
        try:
            parsed = await self._parse_body(request, partial(parse_chat_completion_request,
                                                             max_messages=service.settings.max_messages))
            self._check_model(parsed.model, param="model")
            params = await self._sampling_params(parsed)
            self._check_engine(params, {"grammar": parsed.grammar_param})
            explicit = parsed.token_limit() is not None
            tools = offered_tools(parsed)
            messages, render = self._with_tools(plain_messages(parsed), tools)
            turns = await self._start_choices(parsed.n or 1, params, lambda choice_params: service.stateless_turn(
                messages, choice_params, explicit_max_tokens=explicit, user=parsed.user, render=render))
        except OpenAIError as exc:
            return exc.response()
        except ChatError as exc:
            assert parsed is not None  # turns only start from a parsed request
            return _openai_error(exc, service.context_len, parsed.token_limit()).response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        fmt = self._tool_format() if tools else None
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        completions = [_Completion(turn, model=self.response_model(parsed.model), include_usage=include_usage,
                                   tools=fmt, forced=bool(parsed.forced_functions()), index=index,
                                   parallel_calls=parsed.parallel_tool_calls is not False)
                       for index, turn in enumerate(turns)]
        return _answer(completions, bool(parsed.stream), self._refuse)

    async def handle_completions(self, request: Request) -> Any:
        """``POST /v1/completions``: the prompt as given, no chat template."""
        service = self.service
        parsed: CompletionRequest | None = None
        turns: list[Turn] = []
        try:
            parsed = await self._parse_body(request, partial(parse_completion_request, context_len=service.context_len,
                                                             vocab_size=service.vocab_size))
            self._check_model(parsed.model, param="model")
            params = await self._sampling_params(parsed)
            self._check_engine(params, {"grammar": parsed.grammar_param})
            prompt = prompt_text(parsed)
            text = prompt if isinstance(prompt, str) else ""
            ids = None if isinstance(prompt, str) else list(prompt)
            echo = ""
            if parsed.echo:
                echo = text if ids is None else await service.run_bounded(
                    lambda: str(service.tokenizer.decode(ids)), lane="tokenize")
            turns = await self._start_choices(parsed.n or 1, params, lambda choice_params: service.stateless_turn(
                [{"role": "user", "content": text}], choice_params, explicit_max_tokens=parsed.max_tokens is not None,
                user=parsed.user, render=lambda _: ids if ids is not None else self._encode_prompt(text)))
        except OpenAIError as exc:
            return exc.response()
        except ChatError as exc:
            asked = parsed.token_limit() if parsed is not None else None
            return _openai_error(exc, service.context_len, asked, param="prompt").response()
        except ClientDisconnect:
            return Response(status_code=400)
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        model = self.response_model(parsed.model)
        encoders = [_TextEncoder(turn, TextCompletion(model, include_usage, index=index, echo=echo,
                                                      logprobs=parsed.logprobs is not None))
                    for index, turn in enumerate(turns)]
        return _answer(encoders, bool(parsed.stream), self._refuse)

    async def _start_choices(self, n: int, params: SamplingParams,
                             new_turn: Callable[[SamplingParams], Turn]) -> list[Turn]:
        """Start ``n`` turns, one a choice (choice ``i`` seeded ``seed + i``; the prefix cache shares the
        prompt's blocks); a 400 when ``n`` can never fit, and none left running when one fails to start."""
        room = self.service.settings.concurrency + self.service.settings.queue_size
        if n > room:
            raise OpenAIError(400, f"Invalid value for 'n': {n} choices are {n} generations; this "
                              f"server runs or queues at most {room} at once.", param="n", code="invalid_value")
        turns: list[Turn] = []
        try:
            for index in range(n):
                seed = None if params.seed is None else (params.seed + index) % (1 << 64)
                turns.append(new_turn(replace(params, seed=seed) if index else params))
                await turns[-1].start()
        except BaseException:
            for started in turns:
                started.cancel()
            raise
        return turns

    async def handle_responses(self, request: Request) -> Any:
        """``POST /v1/responses``: see :mod:`.responses`."""
        service = self.service
        parsed: ResponsesRequest | None = None
        try:
            parsed = await self._parse_body(request, partial(parse_responses_request,
                                                             max_messages=service.settings.max_messages))
            self._check_model(parsed.model, param="model")
            history: list[dict[str, Any]] = []
            if parsed.previous_response_id is not None:
                stored = await service.session_store.get(
                    STORE_PREFIX + check_response_id(parsed.previous_response_id))
                if stored is None:
                    raise OpenAIError(404, f"Previous response with id '{parsed.previous_response_id}' not found.",
                                      param="previous_response_id", code="previous_response_not_found")
                history = list(stored.get("messages") or [])
            conversation = history + input_messages(parsed)
            if len(conversation) > service.settings.max_messages:
                raise OpenAIError(400, f"The conversation has {len(conversation)} messages; this server keeps at "
                                  f"most {service.settings.max_messages}.", param="input", code="too_many_messages")
            head = [{"role": "system", "content": parsed.instructions}] if parsed.instructions else []
            params = await self._sampling_params(parsed)
            self._check_engine(params, {"grammar": parsed.grammar_param})
            forced = parsed.forced_functions()
            tools = chat_tools(parsed)
            messages, render = self._with_tools(head + conversation, tools)
            turn = service.stateless_turn(messages, params, user=parsed.user,
                                          explicit_max_tokens=parsed.max_output_tokens is not None, render=render)
            await turn.start()
        except OpenAIError as exc:
            return exc.response()
        except ChatError as exc:
            asked = parsed.token_limit() if parsed is not None else None
            return _openai_error(exc, service.context_len, asked, param="input").response()
        except ClientDisconnect:
            return Response(status_code=400)
        fmt = self._tool_format() if tools else None
        response = ResponseObject(parsed, self.response_model(parsed.model), tools=fmt, forced=bool(forced))

        async def store(text: str, done: Done) -> None:
            final = response.whole(text, done)  # ends the response: the stored copy is what is sent
            if parsed.store is not False:
                record = {"messages": [*conversation, response.chat_message()], "response": final}
                await service.session_store.set(STORE_PREFIX + response.id, record, service.settings.session_ttl_s)

        storing = cast(Turn, StoringTurn(turn, store))
        if parsed.stream:
            return TurnStreamingResponse(storing, response.encode_event, "text/event-stream", refuse=self._refuse)
        return _WholeCompletion(storing, response)

    async def handle_stored_response(self, request: Request) -> Response:
        """``GET`` a stored response again, or ``DELETE`` it."""
        try:
            self._authorize(request)
            response_id = check_response_id(request.path_params["response_id"], param="response_id")
            store = self.service.session_store
            stored = await store.get(STORE_PREFIX + response_id)
            if stored is None:
                raise OpenAIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                                  code="not_found")
        except OpenAIError as exc:
            return exc.response()
        if request.method == "DELETE":
            await store.delete(STORE_PREFIX + response_id)
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        return JSONResponse(stored.get("response"))

    # -- helpers --
    async def _parse_body(self, request: Request, parse: Callable[[bytes], RequestT], *, start: bool = True,
                          lane: str = "turns") -> RequestT:
        """Authorize, wait for the engine (``start``), read the body and validate it with ``parse``: off
        the event loop when it is large (a 4 MiB body takes the better part of a second to validate)."""
        self._authorize(request)
        if start:
            await self.service.start()
        settings = self.service.settings
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        if len(body) > _PARSE_ON_LOOP_BYTES:
            return await self.service.run_bounded(parse, body, lane=lane)
        return parse(body)

    async def _sampling_params(self, request: OpenAIRequest) -> SamplingParams:
        """:func:`to_sampling_params`, off the event loop when it compiles a schema (a grammar, or the
        tools' ``parameters`` checked): llguidance takes 45-130 ms for a 58 KB schema, 5-24 ms for
        Open WebUI's 36 forced tools (it lets go of the GIL meanwhile), during which every other
        user's stream and request would wait. The grammar lane is its own,
        so a grammar never waits for a long prompt to render, nor a render for a grammar."""
        defaults, limits = self.service.defaults, self._limits()
        if request.compiles_schemas():
            return await self.service.run_bounded(to_sampling_params, request, defaults, limits, lane="grammar")
        return to_sampling_params(request, defaults, limits)

    def _check_engine(self, params: Any, wire_names: dict[str, str]) -> None:
        """400 for a field the engine would silently ignore (the mock and remote engines enforce no grammar)."""
        lacking = self.service.cannot_honour(params)
        if lacking is not None:
            param = wire_names.get(lacking, lacking)
            raise unsupported(param, f"'{param}' with this engine (only the local engine enforces it)")

    def _with_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                    ) -> tuple[list[dict[str, Any]], Callable[[list[dict[str, Any]]], list[int]] | None]:
        """The messages a turn is given and how they become prompt ids, with ``tools`` offered or tool
        calls in the history: through the chat template (:meth:`_render_with_tools`); for an engine
        that sends messages upstream, written out as Hermes-style text (tools in the system message,
        calls and results as text), since the upstream is not sent ``tools``: llama.cpp's server takes
        them only with ``--jinja``, vLLM's ``auto`` only with a parser flag. Calls are then parsed
        from the reply's text, as with the local engine."""
        if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            return messages, None
        if self.service.forwards_requests:
            return template_messages(messages, tools, native=False), None
        return messages, lambda m: self._render_with_tools(m, tools)

    def _tool_format(self) -> ToolFormat:
        """The format tool calls are parsed in: the setting's, else what the chat template writes
        (Hermes for an upstream engine, which is told to write that: see :meth:`_with_tools`)."""
        tokenizer = None if self.service.forwards_requests else self.service.tokenizer
        return tool_format(tokenizer, getattr(self.service.settings, "tool_call_parser", None))

    @property
    def _refuse(self) -> Callable[[TurnEvent], Response | None] | None:
        """For a stream: how an upstream engine's refusal of the request becomes its 400 (the
        status then waits for the turn's first event); None with the local engine, which refuses
        nothing once a turn has started."""
        return _refusal if self.service.forwards_requests else None

    def _encode_prompt(self, text: str) -> list[int]:
        return list(self.service.tokenizer.encode(text, add_special_tokens=True))

    def _render_with_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[int]:
        """Prompt ids with the tools and tool messages through the chat template (off the event loop)."""
        tokenizer = self.service.tokenizer
        native = template_supports_tools(tokenizer)
        rendered = template_messages(messages, tools, native)
        if not native:  # the tools are described in the system message, calls and results are text
            return self.service.render_messages(rendered)
        try:
            text = tokenizer.apply_chat_template(rendered, tools=tools or None, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:
            raise InvalidRequest(f"the messages cannot be rendered with the model's chat template: {exc}",
                                 param="messages") from None
        return list(tokenizer.encode(text, add_special_tokens=False))

    def response_model(self, asked: str | None) -> str:
        """The ``model`` a response names: the one asked for if it is served, else the first served name."""
        names = self.served_names
        if asked is not None and asked in names:
            return asked
        return (names or [self.service.model_name])[0]

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        token = bearer_token(request.headers)
        if not token:
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    @property
    def served_names(self) -> list[str]:
        """The names ``model`` may take; empty: any (one model is served, whatever a client calls it)."""
        names = getattr(self.service.settings, "served_model_name", None) or ""
        return [n.strip() for n in names.split(",") if n.strip()]

    def _model_card(self) -> dict[str, Any]:
        name = (self.served_names or [self.service.model_name])[0]
        return {"id": name, "object": "model", "created": self.created, "owned_by": "chatstream"}

    def _check_model(self, model: str | None, param: str | None) -> None:
        names = self.served_names
        if model is not None and names and model not in names:
            raise OpenAIError(
                404, f"The model `{model}` does not exist. This server serves `{'`, `'.join(names)}`.",
                param=param, code="model_not_found",
            )

    def _limits(self) -> SamplingLimits:
        return SamplingLimits(max_new_tokens=self.service.settings.max_new_tokens, vocab_size=self.service.vocab_size)


def _openai_error(exc: ChatError, context_len: int, asked: int | None = None,
                  param: str = "messages") -> OpenAIError:
    """A domain error in OpenAI's envelope; a prompt that does not fit names ``param`` (the request's
    input field) and the ``asked`` completion tokens."""
    if isinstance(exc, PromptTooLong):
        prompt = exc.prompt_tokens or 0
        requested = f"However, your {param} resulted in {prompt} tokens" if asked is None else (
            f"However, you requested {prompt + asked} tokens ({prompt} in the {param}, {asked} in the completion)")
        return OpenAIError(400, f"This model's maximum context length is {context_len} tokens. {requested}. "
                           f"Please reduce the length of the {param} or completion.",
                           param=param, code="context_length_exceeded")
    if isinstance(exc, QueueFull):
        return OpenAIError(503, "The server is overloaded: all generation slots and the wait queue are full. Retry later.",
                           type="server_error", code="too_many_requests", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ModelNotReady):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        message = exc.message[0].upper() + exc.message[1:] + "."
        return OpenAIError(503, message, type="server_error", code=exc.code, headers=headers)
    if isinstance(exc, InvalidRequest):
        return OpenAIError(400, exc.message, param=exc.param, code="invalid_value")
    return OpenAIError(400, exc.message, code=exc.code)


def _answer(encoders: Sequence[_Completion | _TextEncoder], stream: bool,
            refuse: Callable[[TurnEvent], Response | None] | None = None) -> Response:
    """The answer of started choices: streamed or whole, one choice or ``n`` under one id
    (``refuse``: see :class:`TurnStreamingResponse`)."""
    if len(encoders) > 1:
        choices = _Choices(encoders)
        if stream:
            return TurnStreamingResponse(cast(Turn, choices), choices.encode_chunk, "text/event-stream", refuse=refuse)
        return _WholeChoices(choices)
    if stream:
        return TurnStreamingResponse(encoders[0].turn, encoders[0].encode_chunk, "text/event-stream", refuse=refuse)
    return _WholeCompletion(encoders[0].turn, encoders[0])


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    try:
        return await read_request_body(request, max_bytes, timeout_s)
    except BodyTooLarge:
        raise OpenAIError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large") from None
    except BodyTimeout:
        raise OpenAIError(408, "The request body stopped arriving.", code="request_timeout") from None


class _Completion:
    """Encodes one turn's events as OpenAI chat-completion chunks (or collects them whole)."""

    def __init__(self, turn: Turn, *, model: str, include_usage: bool, tools: ToolFormat | None = None,
                 forced: bool = False, index: int = 0, parallel_calls: bool = True) -> None:
        self.turn = turn
        self.index = index
        self.last = True  # the stream ends with this choice (else _Choices ends it)
        self.model = model
        self.include_usage = include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._role_sent = False
        self.forced = forced  # the reply is exactly one call's JSON (the grammar made it so)
        self.parallel_calls = parallel_calls  # False: at most one call (parallel_tool_calls: false)
        self._calls = ToolCallStream(tools or "hermes", forced=forced, parallel=parallel_calls) \
            if tools is not None or forced else None

    def encode_chunk(self, event: TurnEvent) -> str | None:
        if isinstance(event, Queued):
            return f": queued, position {event.position}\n\n"  # an SSE comment: clients skip it
        if isinstance(event, Failed):
            return _sse(_failure(event).body)
        head = "" if self._role_sent else self._chunk({"role": "assistant", "content": ""})
        self._role_sent = True
        if isinstance(event, Delta):
            text, deltas = self._calls.feed(event.text) if self._calls is not None else (event.text, [])
            out = head
            if text or event.logprobs:
                out += self._chunk({"content": text}, logprobs=event.logprobs)
            if deltas:  # OpenAI's shape: the name first (empty arguments), then argument fragments
                out += self._chunk({"tool_calls": deltas})
            return out or None
        assert isinstance(event, Done)
        text, deltas = self._calls.finish() if self._calls is not None else ("", [])
        out = head + (self._chunk({"content": text}) if text else "")
        if deltas:
            out += self._chunk({"tool_calls": deltas})
        calls = self._calls.calls if self._calls is not None else []
        out += self._chunk({}, finish_reason=self.finish_reason(event, calls), logprobs=event.logprobs or None)
        if not self.last:
            return out
        if self.include_usage:
            out += _sse({**self._chunk_head(), "choices": [], "usage": self.usage(event)})
        return out + "data: [DONE]\n\n"

    def _end(self, whole: str) -> tuple[str, list[dict[str, Any]]]:
        """The content and the tool calls of a whole reply."""
        if self.forced:
            calls = parse_forced_call(whole)
            text = "" if calls else whole
        elif self._calls is not None:
            content, calls = parse_tool_calls(whole, self._calls.fmt)
            text = content or ""
        else:
            text, calls = whole, []
        if not self.parallel_calls:
            calls = calls[:1]
        return text, [{"id": new_call_id(), "type": "function", "function": c} for c in calls]

    @staticmethod
    def finish_reason(done: Done, calls: list[Any]) -> str:
        return "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason

    def whole(self, text: str, done: Done, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        content, calls = self._end(text)
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""),
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{
                "index": self.index, "message": message,
                "logprobs": {"content": list(logprobs), "refusal": None} if logprobs else None,
                "finish_reason": self.finish_reason(done, calls),
            }],
            "usage": self.usage(done),
        }

    def usage(self, done: Done) -> dict[str, int]:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    def _chunk_head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: Sequence[dict[str, Any]] | None = None) -> str:
        chunk = {**self._chunk_head(), "choices": [
            {"index": self.index, "delta": delta, "finish_reason": finish_reason,
             "logprobs": {"content": list(logprobs), "refusal": None} if logprobs else None}
        ]}
        if self.include_usage:
            chunk["usage"] = None
        return _sse(chunk)


class _Choices:
    """``n`` > 1: the choices' turns as one (events tagged with their choice), under one completion id."""

    def __init__(self, completions: Sequence[_Completion | _TextEncoder]) -> None:
        self.completions = completions
        for completion in completions:
            completion.id, completion.created, completion.last = completions[0].id, completions[0].created, False
        self.dones: dict[int, Done] = {}

    def cancel(self) -> None:
        for completion in self.completions:
            completion.turn.cancel()

    async def events(self) -> AsyncGenerator[tuple[int, TurnEvent], None]:
        queue: asyncio.Queue[tuple[int, TurnEvent] | None] = asyncio.Queue()

        async def pump(index: int, turn: Turn) -> None:
            async for event in turn.events():
                queue.put_nowait((index, event))
            queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i, c.turn)) for i, c in enumerate(self.completions)]
        try:
            ended = 0
            while ended < len(tasks):
                item = await queue.get()
                if item is None:
                    ended += 1
                    continue
                yield item
                if isinstance(item[1], Failed):  # one choice failed: the answer has failed
                    self.cancel()
                    return
        finally:
            for task in tasks:
                task.cancel()

    def encode_chunk(self, item: Any) -> str | None:
        index, event = item
        if isinstance(event, Queued):
            return None
        out = self.completions[index].encode_chunk(event)
        if isinstance(event, Failed):
            return (out or "") + "data: [DONE]\n\n"
        if isinstance(event, Done):
            self.dones[index] = event
            if len(self.dones) == len(self.completions):
                if self.completions[0].include_usage:
                    out = (out or "") + _sse({**self.completions[0]._chunk_head(), "choices": [],
                                              "usage": self.usage()})
                out = (out or "") + "data: [DONE]\n\n"
        return out

    def usage(self) -> dict[str, int]:
        prompt = max(d.prompt_tokens for d in self.dones.values())  # the prompt counts once, as OpenAI's
        completion = sum(d.completion_tokens for d in self.dones.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _WholeChoices(Response):
    """The non-streaming answer of ``n`` > 1 choices."""

    def __init__(self, choices: _Choices) -> None:
        self.background = None
        self.choices = choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = asyncio.create_task(wait_for_disconnect(receive))
        listener.add_done_callback(lambda task: None if task.cancelled() else self.choices.cancel())
        try:
            texts: dict[int, list[str]] = {i: [] for i in range(len(self.choices.completions))}
            logprobs: dict[int, list[dict[str, Any]]] = {i: [] for i in texts}
            status, body = 500, cast(Any, _failure(None).body)
            async for index, event in self.choices.events():
                if isinstance(event, Delta):
                    texts[index].append(event.text)
                    logprobs[index] += event.logprobs
                elif isinstance(event, Done):
                    self.choices.dones[index] = event
                    logprobs[index] += event.logprobs
                elif isinstance(event, Failed):
                    error = _failure(event)
                    status, body = error.status, error.body
            if len(self.choices.dones) == len(texts):
                answers = [c.whole("".join(texts[i]), self.choices.dones[i], logprobs[i])
                           for i, c in enumerate(self.choices.completions)]
                status, body = 200, {**answers[0], "choices": [a["choices"][0] for a in answers],
                                     "usage": self.choices.usage()}
            if not listener.done():
                await _send_json(send, status, body)
        except asyncio.CancelledError:
            self.choices.cancel()
            raise
        finally:
            listener.cancel()


class _TextEncoder:
    """``/v1/completions``' events for one choice: ``text_completion`` chunks, then ``[DONE]``."""

    def __init__(self, turn: Turn, completion: TextCompletion) -> None:
        self.turn = turn
        self.completion = completion
        self.index = completion.index
        self.include_usage = completion.include_usage
        self.last = True  # the stream ends with this choice (else _Choices ends it)
        self._echoed = not completion.echo

    @property
    def id(self) -> str:
        return self.completion.id

    @id.setter
    def id(self, value: str) -> None:
        self.completion.id = value

    @property
    def created(self) -> int:
        return self.completion.created

    @created.setter
    def created(self, value: int) -> None:
        self.completion.created = value

    def _chunk_head(self) -> dict[str, Any]:
        return self.completion.head()

    def encode_chunk(self, event: TurnEvent) -> str | None:
        if isinstance(event, Queued):
            return f": queued, position {event.position}\n\n"
        if isinstance(event, Failed):
            return _sse(_failure(event).body)
        out = "" if self._echoed else _sse(self.completion.chunk(self.completion.echo))
        self._echoed = True
        if isinstance(event, Delta):
            return out + _sse(self.completion.chunk(event.text, logprobs=event.logprobs))
        assert isinstance(event, Done)
        out += _sse(self.completion.chunk("", event.finish_reason, event.logprobs))
        if not self.last:
            return out
        if self.include_usage:
            out += _sse(self.completion.usage_chunk(event))
        return out + "data: [DONE]\n\n"

    def whole(self, text: str, done: Done, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        return self.completion.whole(text, done, logprobs)

    def usage(self, done: Done) -> dict[str, int]:
        return completion_usage(done)


class _WholeCompletion(Response):
    """The non-streaming answer: waits for the whole reply, listening for a client that leaves."""

    def __init__(self, turn: Turn, completion: _Completion | _TextEncoder | ResponseObject) -> None:
        self.background = None  # not Response.__init__: the body is only known at the end
        self.turn = turn
        self.completion = completion

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = watch_disconnect(receive, self.turn)
        try:
            text: list[str] = []
            logprobs: list[dict[str, Any]] = []
            status, body = 500, cast(Any, _failure(None).body)
            async for event in self.turn.events():
                if isinstance(event, Delta):
                    text.append(event.text)
                    logprobs += event.logprobs
                elif isinstance(event, Done):
                    logprobs += event.logprobs
                    status, body = 200, self.completion.whole("".join(text), event, logprobs)
                elif isinstance(event, Failed):
                    error = _failure(event)
                    status, body = error.status, error.body
            if not listener.done():
                await _send_json(send, status, body)
        except asyncio.CancelledError:
            self.turn.cancel()
            raise
        finally:
            listener.cancel()


def _refusal(event: Any) -> Response | None:
    """The 400 answered instead of a stream whose first event says the request was refused."""
    event = event[1] if isinstance(event, tuple) else event  # a choice's event (n > 1)
    if isinstance(event, Failed) and event.code == "invalid_request":
        return _failure(event).response()
    return None


def _failure(failed: Failed | None) -> OpenAIError:
    if failed is not None and failed.code in ("server_shutting_down", "queue_timeout"):
        return OpenAIError(503, failed.message, type="server_error", code=failed.code)
    if failed is not None and failed.code == "invalid_request":  # e.g. an upstream engine refused a field
        return OpenAIError(400, failed.message, param=failed.param, code="invalid_value")
    detail = failed.message if failed is not None else "an unexpected error occurred"
    return OpenAIError(500, f"The generation failed: {detail}", type="server_error",
                       code=failed.code if failed is not None else "generation_failed")


async def _send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
    ]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
