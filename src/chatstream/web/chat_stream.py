"""``ChatStream``: the seed API that puts a streaming chat endpoint into a FastAPI/Starlette app."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..admission import AdmissionQueue, QueueFullError
from ..conversation import ChatPrompt, PromptTooLongError
from ..engine import Engine, SamplingParams
from ..engine.mock import MockEngine, MockTokenizer
from ..model_loader import load_model, model_display_name
from ..session import Session, SessionMiddleware, SessionStore
from .chat_request import BadRequest, parse_chat_stream_request
from .chat_turn import Callback, ChatTurn
from .loop_lag import LoopLagMonitor
from .responses import DisconnectAwareStreamingResponse, error_response, sse_event

logger = logging.getLogger("chatstream")


class ChatStream:
    """Streaming chat under load control, with the conversation kept in a server-side session.

    Pass a loaded ``model`` and ``tokenizer`` (see :func:`chatstream.load_model`), or neither to
    load ``model_path`` (default: the embedded SmolLM2-135M-Instruct) in the background when the
    server starts, or ``use_mock_response=True`` to stream canned text without a model.
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
        max_input_chars: int = 8000,
        session_store: SessionStore | None = None,
        session_secret: str | None = None,
        session_ttl_s: int = 14 * 24 * 3600,
        secure_cookies: bool = False,
        kv_cache_memory_bytes: int | None = None,
        model_path: str | None = None,
        model_name: str | None = None,
        mock_token_delay: float = 0.03,
        engine: Engine | None = None,
    ) -> None:
        if (model is None) != (tokenizer is None):
            raise TypeError("pass both model= and tokenizer=, or neither")
        if max_new_tokens >= context_len:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than context_len ({context_len})")
        if not (isinstance(chat_prompt_clazz, type) and issubclass(chat_prompt_clazz, ChatPrompt)):
            raise TypeError("chat_prompt_clazz must be a subclass of chatstream.ChatPrompt")
        self.device = device
        self.chat_prompt_clazz = chat_prompt_clazz
        self.context_len = context_len
        self.system_prompt = system_prompt
        self.max_input_chars = max_input_chars
        self.default_params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        self.admission = AdmissionQueue(num_of_concurrent_executions, max_queue_size)
        self.session_store = session_store
        self.session_secret = session_secret
        self.session_ttl_s = session_ttl_s
        self.secure_cookies = secure_cookies
        self.loop_lag = LoopLagMonitor()
        self._model_path = model_path
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self._load_task: asyncio.Task[None] | None = None
        self.load_error: str | None = None
        self.tokenizer: Any = tokenizer
        self.engine: Engine | None = engine
        self.model_name = model_name or model_display_name(model_path)
        if use_mock_response:
            self.tokenizer = tokenizer or MockTokenizer()
            self.engine = MockEngine(self.tokenizer, token_delay=mock_token_delay)
            self.model_name = model_name or "mock"
        elif engine is None and model is not None:
            self._attach(model, tokenizer)

    # -- model and engine lifecycle --
    def _attach(self, model: Any, tokenizer: Any) -> None:
        from ..engine.llm_engine import LLMEngine

        self.tokenizer = tokenizer
        self.engine = LLMEngine(
            model, tokenizer, max_num_seqs=self.admission.max_concurrent, device=self.device,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
        )
        # A loaded model leaves ~400k long-lived Python objects; a full garbage collection walks
        # them all (~180 ms on two cores) and stalls the event loop. Collect once now and move the
        # survivors out of the collector's view, as long-running servers commonly do.
        gc.collect()
        gc.freeze()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready

    async def start_queue_worker(self) -> None:
        """Start the engine (and the model load, if it was deferred). Optional: requests start it too."""
        self.loop_lag.start()
        if self.engine is None and self._load_task is None and self.load_error is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load())
        if self.engine is not None:
            await self.engine.start()

    async def _load(self) -> None:
        try:
            model, tokenizer = await asyncio.to_thread(load_model, self._model_path, device=self.device)
            self._attach(model, tokenizer)
            assert self.engine is not None
            await self.engine.start()
            logger.info("model %s is ready", self.model_name)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the model failed")

    async def shutdown(self) -> None:
        self.loop_lag.stop()
        if self.engine is not None:
            await self.engine.shutdown()

    # -- wiring, as the original library did it --
    def append_middlewares(self, app: Any) -> None:
        """Install the session middleware (signed cookie, server-side store)."""
        app.add_middleware(
            SessionMiddleware, store=self.session_store, secret=self.session_secret,
            max_age_s=self.session_ttl_s, https_only=self.secure_cookies,
        )

    def append_apis(self, app: Any) -> None:
        """Add the default routes: /chat_stream, /clear_context, /history, /health, /stats/loop_lag."""
        app.add_route("/chat_stream", self.handle_chat_stream_request, methods=["POST"])
        app.add_route("/clear_context", self.handle_clear_context_request, methods=["POST"])
        app.add_route("/history", self.handle_history_request, methods=["GET"])
        app.add_route("/health", self.handle_health_request, methods=["GET"])
        app.add_route("/stats/loop_lag", self.handle_loop_lag_request, methods=["GET"])

    def append_openai_apis(self, app: Any, api_key: str | None = None) -> None:
        """Add the OpenAI-compatible API (/v1/chat/completions, /v1/models), sharing this load control."""
        from .openai_api import add_openai_routes

        add_openai_routes(app, self, api_key=api_key)

    def append_ui(self, app: Any) -> None:
        """Serve the browser chat UI at / (it talks to /chat_stream, /clear_context and /history)."""
        from .ui import add_ui_routes

        add_ui_routes(app)

    # -- routes --
    async def handle_chat_stream_request(
        self, request: Request, request_body: bytes | None = None, callback: Callback | None = None
    ) -> Response:
        """Answer one chat turn as a stream (SSE by default; bare text for ``Accept: text/plain``)."""
        await self.start_queue_worker()
        body = request_body if request_body is not None else await request.body()
        try:
            parsed = parse_chat_stream_request(body, self.max_input_chars)
            params = parsed.sampling_params(self.default_params)
        except BadRequest as exc:
            return error_response(exc.status, exc.code, str(exc))
        if not self.ready:
            return self._not_ready_response()
        assert self.engine is not None
        session = _session_of(request)
        if not await session.try_lock():
            return error_response(409, "session_busy", "a reply is already being generated in this session; wait for it to finish or stop it")
        try:
            chat_prompt = await self._chat_prompt_of(session)
            previous_reply: str | None = None
            if parsed.regenerate:
                previous_reply = chat_prompt.get_responder_last_msg()
                if not chat_prompt.clear_last_responder_message():
                    raise BadRequest("there is no reply to regenerate in this conversation", code="nothing_to_regenerate")
            else:
                chat_prompt.add_requester_msg(parsed.user_input)
            prompt_ids = await asyncio.to_thread(chat_prompt.render_ids, self.context_len - params.max_new_tokens)
            ticket = self.admission.try_enter()
        except BadRequest as exc:
            await self._abandon(session)
            return error_response(exc.status, exc.code, str(exc))
        except PromptTooLongError as exc:
            await self._abandon(session)
            return error_response(413, "input_too_large", str(exc))
        except QueueFullError as exc:
            await self._abandon(session)
            return error_response(
                503, "too_many_requests", "the server is busy: all generation slots and the wait queue are full; retry later",
                headers={"Retry-After": str(exc.retry_after)},
            )
        except BaseException:
            await self._abandon(session)
            raise

        turn = ChatTurn(
            request=request, session=session, chat_prompt=chat_prompt, prompt_ids=prompt_ids,
            params=params, engine=self.engine, ticket=ticket, callback=callback, previous_reply=previous_reply,
        )
        turn.start()
        as_text = request.query_params.get("format") == "text" or (
            "text/plain" in request.headers.get("accept", "") and "text/event-stream" not in request.headers.get("accept", "")
        )
        if as_text:
            return DisconnectAwareStreamingResponse(
                _text_events(turn), turn.client_disconnected, "text/plain",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return DisconnectAwareStreamingResponse(
            _sse_events(turn), turn.client_disconnected, "text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def handle_clear_context_request(self, request: Request) -> Response:
        """Empty this session's conversation."""
        session = _session_of(request)
        if not await session.try_lock():
            return error_response(409, "session_busy", "a reply is being generated in this session; stop it first")
        try:
            await session.load()
            session.data["chat_prompt"] = ChatPrompt(system=self.system_prompt).to_dict()
            session.get_session().pop("chat_prompt", None)
            await session.save()
        finally:
            await session.unlock()
        return JSONResponse({"status": "cleared"})

    async def handle_history_request(self, request: Request) -> Response:
        """This session's conversation as ``{"messages": [{"role", "content"}, ...]}``."""
        session = _session_of(request)
        data = await session.load()
        stored = data.get("chat_prompt") or {}
        return JSONResponse({"messages": stored.get("messages", [])})

    async def handle_health_request(self, request: Request) -> Response:
        await self.start_queue_worker()
        body: dict[str, Any] = {
            "status": "ok" if self.ready else ("error" if self.load_error else "loading"),
            "model": self.model_name,
            "running": self.admission.running,
            "waiting": self.admission.waiting,
            "max_concurrent": self.admission.max_concurrent,
            "max_queue": self.admission.max_queue,
        }
        if self.load_error:
            body["error"] = self.load_error
        return JSONResponse(body, status_code=200 if self.ready else 503)

    async def handle_loop_lag_request(self, request: Request) -> Response:
        try:
            since = float(request.query_params.get("since", "0"))
        except ValueError:
            return error_response(400, "invalid_request", "'since' must be a unix time in seconds")
        return JSONResponse(self.loop_lag.summary(since))

    # -- helpers --
    def _not_ready_response(self) -> Response:
        if self.load_error:
            return error_response(503, "model_unavailable", f"the model failed to load: {self.load_error}")
        return error_response(503, "model_loading", "the model is still loading; retry shortly", headers={"Retry-After": "5"})

    async def _chat_prompt_of(self, session: Session) -> ChatPrompt:
        data = await session.load()
        chat_prompt = self.chat_prompt_clazz.from_dict(data.get("chat_prompt"), tokenizer=self.tokenizer, system=self.system_prompt)
        session.get_session()["chat_prompt"] = chat_prompt
        return chat_prompt

    async def _abandon(self, session: Session) -> None:
        """A request refused before its turn started: forget in-memory changes, release the lock."""
        session.loaded = False
        session.get_session().pop("chat_prompt", None)
        await session.unlock()


def _session_of(request: Request) -> Session:
    session = getattr(request.state, "session", None)
    if not isinstance(session, Session):
        raise RuntimeError("no session on this request: call chat_stream.append_middlewares(app) when building the app")
    return session


async def _sse_events(turn: ChatTurn):  # type: ignore[no-untyped-def]
    async for event, data in turn.iter_events():
        yield sse_event(event, data)


async def _text_events(turn: ChatTurn):  # type: ignore[no-untyped-def]
    async for event, data in turn.iter_events():
        if event == "delta":
            yield data["text"]
        elif event == "error":
            yield f"\n[error: {data['message']}]\n"
