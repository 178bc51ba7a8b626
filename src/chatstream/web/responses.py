"""Response helpers: JSON errors, Server-Sent Events, and a streaming response that notices disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable, Mapping

from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (``http.disconnect``); the request body is already read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def error_response(
    status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The one error shape of chatstream's own routes: ``{"error": code, "message": ...}``."""
    return JSONResponse({"error": code, "message": message}, status_code=status_code, headers=headers)


def sse_event(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class DisconnectAwareStreamingResponse(StreamingResponse):
    """Streams an async iterator and calls ``on_disconnect`` the moment the client goes away.

    Unlike relying on the server's ASGI spec version, this always listens for
    ``http.disconnect`` while streaming, so cancellation is prompt under any ASGI server.
    The body iterator is expected to end by itself once ``on_disconnect`` has run.
    """

    def __init__(
        self,
        content: AsyncIterator[str],
        on_disconnect: Callable[[], None],
        media_type: str,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers, media_type=media_type)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = asyncio.create_task(wait_for_disconnect(receive))
        listener.add_done_callback(lambda task: task.cancelled() or self.on_disconnect())
        connected = True
        try:
            await send({
                "type": "http.response.start",
                "status": self.status_code,
                "headers": self.raw_headers,
            })
            async for chunk in self.body_iterator:
                if connected and not listener.done():
                    try:
                        body = chunk.encode(self.charset) if isinstance(chunk, str) else bytes(chunk)
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    except OSError:
                        connected = False
                        self.on_disconnect()
            if connected and not listener.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            self.on_disconnect()
        finally:
            listener.cancel()
