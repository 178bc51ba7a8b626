"""The ready server behind ``chatstream serve``: one ``ChatService`` and its faces in a FastAPI app."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from ..metrics import MetricsMiddleware
from ..service import ChatService
from ..settings import Settings
from .auth import AuthMiddleware
from .body_drain import BodyDrainMiddleware
from .chat_stream import ChatStream
from .limits import BodyLimitMiddleware
from .origin import OriginCheckMiddleware
from .server import fastapi_docs_kwargs


def create_app(settings: Settings | None = None, service: ChatService | None = None) -> FastAPI:
    """Build the server app. The model loads in the background; /health is 503 until it is ready.

    Unlike a library ``ChatStream``, the server keeps sessions across restarts: in SQLite in the
    data folder unless ``settings.session_store`` says otherwise, with the cookie secret generated
    once and kept there too. Raises ValueError for a configuration that cannot work (a bad store
    URL; a store shared by several processes without a shared secret).
    """
    settings = server_settings(settings or Settings())
    service = service or ChatService.from_settings(settings)
    chat_stream = ChatStream(service=service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await chat_stream.start_queue_worker()
        freeze = asyncio.get_running_loop().create_task(_freeze_when_loaded(service))
        yield
        freeze.cancel()
        await chat_stream.shutdown()

    app = FastAPI(title="chatstream", lifespan=lifespan, **fastapi_docs_kwargs(settings.docs))
    app.state.service = service
    app.state.chat_stream = chat_stream
    app.state.settings = settings
    chat_stream.append_apis(app)
    chat_stream.append_openai_apis(app)  # the key is checked for every route by AuthMiddleware
    chat_stream.append_ui(app)
    # The last added runs first: BodyDrain -> Metrics -> CORS -> Origin -> Auth -> BodyLimit -> Session -> routes.
    # Auth comes before the body limit so that no body of an unauthenticated client is ever buffered.
    chat_stream.append_middlewares(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       read_timeout_s=settings.body_timeout_s)
    if settings.api_key:
        app.add_middleware(AuthMiddleware, api_key=settings.api_key, secure_cookies=settings.secure_cookies,
                           max_age_s=settings.auth_cookie_max_age_s)
    origins = [o.strip() for o in settings.allowed_origins.split(",") if o.strip()]
    app.add_middleware(OriginCheckMiddleware, allowed_origins=origins)
    cors = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if cors:  # outside auth: a preflight carries no key. Keys, not cookies: no credentials.
        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # sees every answer
    # Outside every middleware that may answer before reading the body (Origin, Auth, BodyLimit).
    app.add_middleware(BodyDrainMiddleware, linger_s=settings.body_linger_s, linger_bytes=settings.body_linger_bytes)
    return app


def server_settings(settings: Settings) -> Settings:
    """``settings`` with the server's defaults filled in: the SQLite store and a kept secret."""
    from ..session import load_or_create_secret

    store = settings.session_store or "sqlite://"
    secret = settings.session_secret
    if secret is None:
        if store.lower().startswith(("redis://", "rediss://")):
            raise ValueError(
                "a Redis session store is shared by several processes: give them all the same "
                "--session-secret (or CHATSTREAM_SESSION_SECRET)"
            )
        secret = load_or_create_secret(settings.resolved_data_dir)
    return settings.model_copy(update={"session_store": store, "session_secret": secret})


async def _freeze_when_loaded(service: ChatService) -> None:
    """Once the model is loaded, move its objects out of the garbage collector's view.

    A loaded model leaves ~400k long-lived Python objects; a full collection walks them all
    (~180 ms on two cores) and stalls the event loop. Long-running servers commonly freeze
    them after start-up; a library object never does this by itself.
    """
    if await service.wait_ready():
        gc.collect()
        gc.freeze()
