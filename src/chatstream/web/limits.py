"""Request-body limits: a size cap and a read timeout on every route, before the app sees the body.

Without them a client could send a 500 MB body into memory, declare ``Content-Length: 10**18``
and keep the server waiting, or stop half-way and hold the request open forever.

:class:`BodyLimitMiddleware` reads the whole body itself (chat bodies are small JSON documents)
and hands it on in one message, so every refusal happens before the app has started answering:

- a declared ``Content-Length`` over the limit is a 413 at once, without reading the body;
- a body (chunked or not) whose bytes pass the limit is a 413 as soon as they do;
- a client that sends nothing for ``read_timeout_s`` mid-body is a 408;
- a client that disconnects mid-body gets no answer and leaves no log line.

Each refusal closes the connection; this middleware never reads the rest of the body (in ``create_app``,
:class:`~chatstream.web.body_drain.BodyDrainMiddleware` reads and discards it first, within bounds, so
that the client reads the refusal instead of a connection reset).
"""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import json_error

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 15.0

_CLOSE = {"Connection": "close"}


class BodyTooLarge(Exception):
    """The request body is larger than allowed."""


class BodyTimeout(Exception):
    """The client stopped sending its request body."""


async def read_body(receive: Receive, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole request body, or :class:`BodyTooLarge`, :class:`BodyTimeout` or ``ClientDisconnect``.

    ``timeout_s`` bounds each wait for the next chunk, not the whole body: a slow but steady
    upload passes, a stalled one does not.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except TimeoutError:
            raise BodyTimeout() from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def read_request_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """A route's own bounded read, for apps that do not install :class:`BodyLimitMiddleware`
    (the seed API in someone else's app): same errors as :func:`read_body`, and a declared
    ``Content-Length`` over the limit is refused before anything is read."""
    length = declared_length(request.scope)
    if length is not None and length > max_bytes:
        raise BodyTooLarge()
    return await read_body(request.receive, max_bytes, timeout_s)


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # the HTTP server rejects malformed values
    return None


class BodyLimitMiddleware:
    """Pure ASGI middleware: caps the request body at ``max_body_bytes`` and bounds its reading time."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        read_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        try:
            body = await read_body(receive, self.max_body_bytes, self.read_timeout_s)
        except BodyTooLarge:
            await self._too_large(scope, receive, send)
            return
        except BodyTimeout:
            response = json_error(
                scope, 408, "request_timeout",
                f"The request body did not arrive: nothing was received for {self.read_timeout_s:g} s.",
                headers=_CLOSE,
            )
            await response(scope, receive, send)
            return
        except ClientDisconnect:
            return  # nobody is left to answer

        replayed = False

        async def receive_body_once() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # from now on: only http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_body_once, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = json_error(
            scope, 413, "request_too_large",
            f"The request body is larger than {self.max_body_bytes} bytes.", headers=_CLOSE,
        )
        await response(scope, receive, send)
