"""Lingering reads: an answer sent before the request body has all arrived reaches the client.

A server that refuses a request early (413 for a body over the limit, 401 without the key, 403
for a foreign origin: all sent before the body is read) and then closes the connection while the
client is still sending leaves unread bytes behind; the kernel answers them with a reset. Clients
that send the whole body before reading the answer (httpx, and with it the OpenAI SDKs) then see
a broken connection instead of the error, and the SDKs retry it. nginx's lingering close is the
usual remedy: keep reading and discarding for a bounded time and size, then close.

:class:`BodyDrainMiddleware` does this at the ASGI level, so it needs nothing from the server.
When the app starts its answer before the request body is complete, it adds
``Connection: close``, sends the answer's bytes at once (clients that read while sending, like
curl and browsers, see it and stop), and holds back only the end of the response while it reads
and discards the rest of the body, at most ``linger_s`` seconds and ``linger_bytes`` bytes. The
body is never buffered: uvicorn stops reading the socket until each chunk is taken. Then the
response ends and the server closes a connection with nothing unread: a clean close. Past either
bound, or when the declared ``Content-Length`` says the rest is larger than ``linger_bytes``, the
response ends at once and the connection closes as it would without this middleware.

No lingering for a 408 (the client stopped sending) or when the client asked
``Expect: 100-continue`` and the app answered before reading (the client then sends no body).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_LINGER_S = 5.0
DEFAULT_LINGER_BYTES = 128 * 2**20  # a 100 MB upload still gets its 413 on a fast link

_CLOSE = (b"connection", b"close")


class _RequestBody:
    """How much of the request body the app has received, through the one ``receive`` it was given."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._receive = receive
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length", b"")
        self.declared: int | None = int(length) if length.isdigit() else None
        self.done = not (b"transfer-encoding" in headers or (self.declared or 0) > 0)
        self.waits_for_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        self.read_started = False
        self.received = 0

    async def receive(self) -> Message:
        self.read_started = True
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.done = True
        else:  # http.disconnect: nothing more will arrive
            self.done = True
        return message


class BodyDrainMiddleware:
    """Pure ASGI middleware: reads and discards what is left of the request body after an early answer."""

    def __init__(self, app: ASGIApp, linger_s: float = DEFAULT_LINGER_S,
                 linger_bytes: int = DEFAULT_LINGER_BYTES) -> None:
        self.app = app
        self.linger_s = linger_s
        self.linger_bytes = linger_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _RequestBody(scope, receive)
        if body.done:  # no body: nothing can be left unread
            await self.app(scope, receive, send)
            return
        early = False
        status = 0

        async def send_then_drain(message: Message) -> None:
            nonlocal early, status
            if message["type"] == "http.response.start" and not body.done:
                early, status = True, message["status"]
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers):
                    headers.append(_CLOSE)  # so the server closes after, instead of reading on without bound
                message = {**message, "headers": headers}
            elif (message["type"] == "http.response.body" and early and not body.done
                  and not message.get("more_body", False)):
                if message.get("body"):
                    await send({"type": "http.response.body", "body": message["body"], "more_body": True})
                if self._should_linger(body, status):
                    await self._drain(body)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, body.receive, send_then_drain)

    def _should_linger(self, body: _RequestBody, status: int) -> bool:
        if self.linger_s <= 0 or status == 408:
            return False
        if body.waits_for_continue and not body.read_started:
            return False  # the client waits for "100 Continue" and, answered instead, sends nothing
        return body.declared is None or body.declared - body.received <= self.linger_bytes

    async def _drain(self, body: _RequestBody) -> None:
        limit = body.received + self.linger_bytes
        try:
            async with asyncio.timeout(self.linger_s):
                while not body.done and body.received <= limit:
                    await body.receive()
        except TimeoutError:
            pass
