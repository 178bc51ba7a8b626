"""One disconnect-aware streaming response for every streaming face (``/chat_stream``, ``/v1``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..service import Turn, TurnEvent


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (``http.disconnect``); the request body is already read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def watch_disconnect(receive: Receive, turn: Turn) -> asyncio.Task[None]:
    """A task that cancels ``turn`` the moment the client disconnects (cancel the task to stop watching)."""

    def on_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            turn.cancel()

    listener = asyncio.create_task(wait_for_disconnect(receive))
    listener.add_done_callback(on_done)
    return listener


class TurnStreamingResponse(Response):
    """Streams a started :class:`Turn`, each event encoded by ``encode`` (``None``: send nothing).

    It listens for ``http.disconnect`` the whole time, so a client that leaves is noticed at once
    under any ASGI server: the turn is cancelled (it leaves the queue or stops generating and
    saves exactly the text this response had sent), and nothing more is written.

    With ``refuse``, the status waits for the turn's first event: if ``refuse`` makes a response
    of it (an upstream engine refused the request), that is the answer instead of a 200 stream.
    A queued turn's first event is its position, so the stream starts at once as without it.
    """

    def __init__(
        self,
        turn: Turn,
        encode: Callable[[TurnEvent], str | None],
        media_type: str,
        headers: Mapping[str, str] | None = None,
        refuse: Callable[[TurnEvent], Response | None] | None = None,
    ) -> None:
        # Not Response.__init__: there is no body to render. A Response subclass all the same, so
        # frameworks (FastAPI) pass it through as the endpoint's answer.
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.turn = turn
        self.encode = encode
        self.raw_headers = [(b"content-type", f"{media_type}; charset=utf-8".encode()),
                        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = watch_disconnect(receive, self.turn)
        try:
            events = self.turn.events()
            try:
                first = None
                if self.refuse is not None:
                    first = await anext(events, None)
                    refusal = self.refuse(first) if first is not None else None
                    if refusal is not None:
                        if not listener.done():
                            await refusal(scope, receive, send)
                        return
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                if first is not None:
                    await self._send(first, send)
                async for event in events:
                    if listener.done():
                        break
                    await self._send(event, send)
            finally:
                await events.aclose()
            if not listener.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (OSError, asyncio.CancelledError):
            self.turn.cancel()  # the connection broke, or the server is stopping this task
            raise
        finally:
            listener.cancel()
        if self.background is not None:
            await self.background()

    async def _send(self, event: TurnEvent, send: Send) -> None:
        chunk = self.encode(event)
        if chunk:
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
