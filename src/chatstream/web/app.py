"""The ready server behind ``chatstream serve``: a FastAPI app around one ``ChatStream``."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from ..settings import Settings
from .chat_stream import ChatStream


def chat_stream_from_settings(settings: Settings) -> ChatStream:
    return ChatStream(
        device=settings.device,
        num_of_concurrent_executions=settings.concurrency,
        max_queue_size=settings.queue_size,
        max_new_tokens=settings.max_new_tokens,
        context_len=settings.context_len,
        kv_cache_memory_bytes=settings.kv_cache_mb * 2**20 if settings.kv_cache_mb else None,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        repetition_penalty=settings.repetition_penalty,
        use_mock_response=settings.mock,
        system_prompt=settings.system_prompt,
        max_input_chars=settings.max_input_chars,
        session_secret=settings.session_secret,
        session_ttl_s=settings.session_ttl_s,
        secure_cookies=settings.secure_cookies,
        model_path=settings.model,
        mock_token_delay=settings.mock_token_delay,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the server app. The model loads in the background; /health is 503 until it is ready."""
    settings = settings or Settings()
    chat_stream = chat_stream_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await chat_stream.start_queue_worker()
        yield
        await chat_stream.shutdown()

    app = FastAPI(title="chatstream", lifespan=lifespan)
    app.state.chat_stream = chat_stream
    app.state.settings = settings
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    chat_stream.append_openai_apis(app, api_key=settings.api_key)
    chat_stream.append_ui(app)
    return app
