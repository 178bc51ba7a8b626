"""The event-loop side of one request: a queue of outputs fed from the engine's thread."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from .protocol import GenerationOutput


class RequestStream:
    """Async iterator over one request's outputs.

    The engine's worker thread puts outputs through :func:`put_many_threadsafe`; the event loop
    iterates. Cancelling calls ``on_cancel(request_id)`` once, which tells the engine to drop the
    sequence before its next step; the engine then puts a final ``cancelled`` output.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_cancel: Callable[[str], None],
        request_id: str | None = None,
    ) -> None:
        self.request_id = request_id or uuid.uuid4().hex
        self._loop = loop
        self._queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._cancelled = False
        self._finished = False  # the consumer has read the final output
        self._closed = False  # the final output has been put

    # -- producer side (on the event loop; other threads use put_many_threadsafe) --
    def put_nowait(self, output: GenerationOutput) -> None:
        """Producer side when already on the event loop."""
        if self._closed:
            return
        self._closed = output.finished
        self._queue.put_nowait(output)

    @property
    def closed(self) -> bool:
        """True once the final output has been put (it may not have been read yet)."""
        return self._closed

    # -- consumer side (event loop) --
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._finished:
            raise StopAsyncIteration
        output = await self._queue.get()
        if output.finished:
            self._finished = True
        return output

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        if not self._cancelled and not self._finished:
            self._cancelled = True
            self._on_cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()


def put_many_threadsafe(outputs: list[tuple[RequestStream, GenerationOutput]]) -> None:
    """Put outputs for many streams from another thread, waking each event loop once.

    The engine hands over a whole step's tokens this way: one wake-up of the loop per step
    rather than one per token, so the loop (and the GIL) interrupts the step once.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, GenerationOutput]]] = {}
    for stream, output in outputs:
        by_loop.setdefault(stream._loop, []).append((stream, output))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass


def _put_all(batch: list[tuple[RequestStream, GenerationOutput]]) -> None:
    for stream, output in batch:
        stream.put_nowait(output)
