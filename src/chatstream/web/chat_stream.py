"""``ChatStream``: the seed API that puts a streaming chat endpoint into a FastAPI/Starlette app.

A thin layer over :class:`~chatstream.service.ChatService`: the constructor keeps the original
library's keyword names, and the ``handle_*`` methods are the ``/chat_stream`` face — they parse
the request, run a :class:`~chatstream.service.Turn`, and encode its events and errors.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..conversation import ChatPrompt
from ..engine import Engine, SamplingParams
from ..errors import ChatError, InvalidRequest, ModelNotReady, PromptTooLong, QueueFull, SessionBusy, StoreUnavailable
from ..metrics import CONTENT_TYPE
from ..service import ChatService, Delta, Done, Failed, Queued, TurnEvent
from ..service.conversations import check_id
from ..service.sampling import SamplingLimits
from ..service.turn import Callback
from ..session import Session, SessionMiddleware, SessionStore
from ..settings import Settings
from .chat_request import ChatStreamRequest
from .json_body import require_json
from .large_json import json_with_list
from .limits import BodyTimeout, BodyTooLarge, read_request_body
from .loop_lag import LoopLagMonitor
from .negotiation import prefers_plain_text
from .streaming import TurnStreamingResponse

# The HTTP status of each domain error on chatstream's own routes.
_STATUS = {
    "invalid_request": 400,
    "nothing_to_regenerate": 400,
    "input_too_large": 413,
    "conversation_too_long": 413,
    "session_busy": 409,
    "conversation_not_found": 404,
    "too_many_conversations": 409,
    "too_many_sessions": 429,
    "too_many_requests": 503,
    "model_loading": 503,
    "model_unavailable": 503,
    "shutting_down": 503,
    "store_unavailable": 503,
    "store_full": 507,
    "session_too_large": 413,
    "lease_lost": 409,
}


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape of chatstream's own routes: ``{"error": code, "message": ...}``."""
    return JSONResponse({"error": code, "message": message}, status_code=status_code, headers=headers)


def chat_error_response(exc: ChatError) -> JSONResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(exc, (QueueFull, ModelNotReady, StoreUnavailable)) and retry_after:
        headers["Retry-After"] = str(retry_after)
    response = error_response(_STATUS.get(exc.code, 400), exc.code, exc.message, headers)
    if isinstance(exc, SessionBusy) and exc.conversation_id is not None:  # which conversation is busy (the UI names it)
        response = JSONResponse({"error": exc.code, "message": exc.message, "conversation_id": exc.conversation_id},
                                status_code=409)
    return response


class ChatStream:
    """Streaming chat under load control, with the conversation kept in a server-side session.

    Pass a loaded ``model`` and ``tokenizer`` (see :func:`chatstream.load_model`), or neither to
    load ``model_path`` (default: the embedded SmolLM2-135M-Instruct) in the background when the
    server starts, or ``use_mock_response=True`` to stream canned text without a model. Or give a
    ready :class:`ChatService` as ``service=`` (what ``chatstream serve`` does).
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        device: str = "cpu",
        num_of_concurrent_executions: int = 2,
        max_queue_size: int = 5,
        chat_prompt_clazz: type[ChatPrompt] = ChatPrompt,
        max_new_tokens: int = 256,
        context_len: int = 1024,
        temperature: float = 0.7,
        top_k: int = 50,
        top_p: float = 0.9,
        repetition_penalty: float = 1.05,
        use_mock_response: bool = False,
        *,
        system_prompt: str | None = None,
        max_input_chars: int | None = None,
        session_store: SessionStore | None = None,
        session_secret: str | None = None,
        session_ttl_s: int = 14 * 24 * 3600,
        secure_cookies: bool = False,
        kv_cache_memory_bytes: int | None = None,
        model_path: str | None = None,
        model_name: str | None = None,
        mock_token_delay: float = 0.03,
        engine: Engine | None = None,
        service: ChatService | None = None,
    ) -> None:
        if (model is None) != (tokenizer is None) and engine is None:
            raise TypeError("pass both model= and tokenizer=, or neither")
        if service is None:
            settings = Settings(
                device=device, concurrency=num_of_concurrent_executions, queue_size=max_queue_size,
                max_new_tokens=max_new_tokens, context_len=context_len, temperature=temperature, top_k=top_k,
                top_p=top_p, repetition_penalty=repetition_penalty, mock=use_mock_response,
                system_prompt=system_prompt, max_input_chars=max_input_chars, session_secret=session_secret,
                session_ttl_s=session_ttl_s, secure_cookies=secure_cookies, model=model_path,
                mock_token_delay=mock_token_delay,
                kv_cache_mb=-(-kv_cache_memory_bytes // 2**20) if kv_cache_memory_bytes else None,
            )
            service = ChatService(settings, model=model, tokenizer=tokenizer, engine=engine,
                                  chat_prompt_clazz=chat_prompt_clazz, model_name=model_name,
                                  session_store=session_store)
        self.service = service
        self.loop_lag = LoopLagMonitor()

    # -- what the service owns, under the names this class always had --
    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def session_store(self) -> SessionStore:
        return self.service.session_store

    @property
    def admission(self) -> Any:
        return self.service.admission

    @property
    def engine(self) -> Engine | None:
        return self.service.engine

    @engine.setter
    def engine(self, engine: Engine | None) -> None:
        self.service.engine = engine

    @property
    def tokenizer(self) -> Any:
        return self.service.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.service.tokenizer = tokenizer

    @property
    def load_error(self) -> str | None:
        return self.service.load_error

    @property
    def model_name(self) -> str:
        return self.service.model_name

    @property
    def default_params(self) -> SamplingParams:
        return self.service.defaults

    @property
    def ready(self) -> bool:
        return self.service.ready

    async def start_queue_worker(self) -> None:
        """Start the engine (and the model load, if it was deferred). Optional: requests start it too."""
        self.loop_lag.start()
        await self.service.start()

    async def shutdown(self) -> None:
        self.loop_lag.stop()
        await self.service.shutdown()

    # -- wiring, as the original library did it --
    def append_middlewares(self, app: Any) -> None:
        """Install the session middleware (signed cookie, server-side store)."""
        settings = self.settings
        app.add_middleware(
            SessionMiddleware, store=self.service.session_store, secret=settings.session_secret,
            max_age_s=settings.session_ttl_s, https_only=settings.secure_cookies,
            new_sessions_per_minute=settings.new_sessions_per_minute,
        )

    def append_apis(self, app: Any) -> None:
        """Add the default routes: /chat_stream, /clear_context, /history, /health, /health/live,
        /stats/loop_lag and /metrics (Prometheus)."""
        app.add_route("/chat_stream", self.handle_chat_stream_request, methods=["POST"])
        app.add_route("/clear_context", self.handle_clear_context_request, methods=["POST"])
        app.add_route("/history", self.handle_history_request, methods=["GET"])
        app.add_route("/health", self.handle_health_request, methods=["GET"])
        app.add_route("/health/live", self.handle_liveness_request, methods=["GET"])
        app.add_route("/stats/loop_lag", self.handle_loop_lag_request, methods=["GET"])
        app.add_route("/metrics", self.handle_metrics_request, methods=["GET"])
        self.append_conversation_apis(app)

    def append_openai_apis(self, app: Any, api_key: str | None = None) -> None:
        """Add the OpenAI-compatible API (/v1/chat/completions, /v1/models), sharing this load control."""
        from .openai import add_openai_routes

        add_openai_routes(app, self.service, api_key=api_key)

    def append_ui(self, app: Any) -> None:
        """Serve the browser chat UI at / (it talks to /chat_stream, /clear_context and /history)."""
        from .ui import add_ui_routes

        add_ui_routes(app)

    def append_conversation_apis(self, app: Any) -> None:
        """Add /conversations (list, create, read, rename and set up, delete) for several conversations per user."""
        from .conversation_routes import add_conversation_routes

        add_conversation_routes(app, self.service)

    # -- the /chat_stream face --
    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | None = None, callback: Callback | None = None
    ) -> Response:
        """Answer one chat turn as a stream (SSE by default; bare text for ``Accept: text/plain``)."""
        await self.start_queue_worker()
        refused = require_json(request)
        if refused is not None:
            return refused
        try:
            body = request_body if request_body is not None else await read_request_body(
                request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        except BodyTooLarge:
            return error_response(413, "request_too_large",
                                  f"the request body is larger than {self.settings.max_body_bytes} bytes")
        except BodyTimeout:
            return error_response(408, "request_timeout", "the request body stopped arriving")
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        try:
            parsed = await ChatStreamRequest.read(body, self.service)
            session = _session_of(request)
            conversation = await self.service.conversation_sampling(session, parsed.conversation_id)
            params = parsed.to_sampling_params(self.service.defaults, self._limits(), conversation)
            if self.service.cannot_honour(params) == "grammar":
                raise InvalidRequest("'response_format' is not supported by this engine (only the local engine "
                                     "enforces it)", param="response_format")
            turn = self.service.session_turn(
                session, params, user_input=parsed.user_input, regenerate=parsed.regenerate,
                request=request, callback=callback, conversation_id=parsed.conversation_id,
            )
            turn.edit_index = parsed.edit_index
            await turn.start()
        except PromptTooLong as exc:
            return chat_error_response(exc.in_context(self.service.context_len, params.max_new_tokens))
        except ChatError as exc:
            return chat_error_response(exc)
        if prefers_plain_text(request.headers.get("accept", ""), request.query_params.get("format")):
            return TurnStreamingResponse(turn, _as_text, "text/plain")
        return TurnStreamingResponse(turn, _as_sse, "text/event-stream")

    async def handle_clear_context_request(self, request: Request) -> Response:
        """Empty this session (and move it to a new id); with ``?conversation_id=``, that conversation only."""
        try:
            await self.service.clear_conversation(_session_of(request), _conversation_id_of(request))
        except ChatError as exc:
            return chat_error_response(exc)
        return JSONResponse({"status": "cleared"})

    async def handle_history_request(self, request: Request) -> Response:
        """The current conversation (or ``?conversation_id=``) as ``{"messages": [{"role", "content"}, ...]}``."""
        try:
            messages = await self.service.history(_session_of(request), _conversation_id_of(request))
        except ChatError as exc:
            return chat_error_response(exc)
        return await json_with_list({}, "messages", messages)

    async def handle_health_request(self, request: Request) -> Response:
        """Readiness: 200 once turns can be served; 503 while loading, failed, draining or while the
        session store fails."""
        await self.start_queue_worker()
        body = self.service.health()
        # Only asked once the model is ready: before that the answer is 503 "loading" anyway.
        store_failure = await self.service.check_store() if self.service.ready else None
        if store_failure is not None:  # turns cannot be saved: send traffic elsewhere until it is back
            body.update(status="store_unavailable", store_error=store_failure)
        return JSONResponse(body, status_code=200 if self.service.ready and store_failure is None else 503)

    async def handle_liveness_request(self, request: Request) -> Response:
        """Liveness: 503 when the engine is stuck (work running, no progress) or stopped by a fault."""
        live = self.service.live
        return JSONResponse({"live": live}, status_code=200 if live else 503)

    async def handle_loop_lag_request(self, request: Request) -> Response:
        try:
            since = float(request.query_params.get("since", "0"))
        except ValueError:
            return error_response(400, "invalid_request", "'since' must be a unix time in seconds")
        return JSONResponse(self.loop_lag.summary(since))

    async def handle_metrics_request(self, request: Request) -> Response:
        """Prometheus text format."""
        return Response(self.service.metrics.render(), media_type=CONTENT_TYPE)

    def _limits(self) -> SamplingLimits:
        return SamplingLimits(max_new_tokens=self.settings.max_new_tokens, vocab_size=self.service.vocab_size)


def _session_of(request: Request) -> Session:
    session = getattr(request.state, "session", None)
    if not isinstance(session, Session):
        raise RuntimeError("no session on this request: call chat_stream.append_middlewares(app) when building the app")
    return session


def _conversation_id_of(request: Request) -> str | None:
    """``?conversation_id=`` (validated), or None for the session's current conversation."""
    value = request.query_params.get("conversation_id")
    return check_id(value) if value is not None else None


def _as_sse(event: TurnEvent) -> str:
    if isinstance(event, Queued):
        return _sse("queued", {"position": event.position})
    if isinstance(event, Delta):
        return _sse("delta", {"text": event.text})
    if isinstance(event, Done):
        return _sse("done", {
            "status": "success", "finish_reason": event.finish_reason, "message_id": event.message_id,
            "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens},
            "timing": event.timing,
        })
    return _sse("error", {"error": event.code, "message": event.message})


def _as_text(event: TurnEvent) -> str | None:
    if isinstance(event, Delta):
        return event.text
    if isinstance(event, Failed):
        return f"\n[error: {event.message}]\n"
    return None


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
