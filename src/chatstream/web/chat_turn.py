"""One chat turn from slot to saved history, run as its own task.

The HTTP response only relays this task's events. Whatever happens (success, client gone in
the queue or mid-stream, engine error) the turn ends in one ``finally``: the reply or partial
reply is written to the history, the session is saved and unlocked, the slot is released, and
the user's callback fires exactly once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from ..admission import Ticket
from ..conversation import ChatPrompt
from ..engine import Engine, GenerationStream, SamplingParams
from ..session import Session

logger = logging.getLogger("chatstream")

SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"

Callback = Callable[[Any, str], Any]
Event = tuple[str, dict[str, Any]]


class ChatTurn:
    def __init__(
        self,
        *,
        request: Any,
        session: Session,
        chat_prompt: ChatPrompt,
        prompt_ids: list[int],
        params: SamplingParams,
        engine: Engine,
        ticket: Ticket,
        callback: Callback | None,
        previous_reply: str | None,
    ) -> None:
        self.request = request
        self.session = session
        self.chat_prompt = chat_prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.engine = engine
        self.ticket = ticket
        self.callback = callback
        self.previous_reply = previous_reply  # restored if a regenerate produced nothing
        self.message_id = uuid.uuid4().hex
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.outcome: str | None = None
        self._stream: GenerationStream | None = None
        self._task: asyncio.Task[None] | None = None
        self._disconnected = False

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    def client_disconnected(self) -> None:
        """The client went away: leave the queue, or stop generating before the next step."""
        if self._disconnected or self._task is None or self._task.done():
            return
        self._disconnected = True
        if self._stream is not None:
            self._stream.cancel()
        else:
            self._task.cancel()

    async def iter_events(self) -> AsyncIterator[Event]:
        while (event := await self.events.get()) is not None:
            yield event

    async def _run(self) -> None:
        received = time.monotonic()
        reply = ""
        streaming = False
        try:
            await self.ticket.wait(lambda position: self._emit("queued", {"position": position}))
            streaming = True
            started = time.monotonic()
            first_token_at: float | None = None
            self._stream = self.engine.generate(self.prompt_ids, self.params, request_id=self.message_id)
            async for output in self._stream:
                if output.text:
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                    reply += output.text
                    self._emit("delta", {"text": output.text})
                if not output.finished:
                    continue
                if output.finish_reason == "cancelled":
                    self.outcome = DISCONNECTED_WHILE_STREAMING if self._disconnected else UNKNOWN_ERROR
                elif output.finish_reason == "error":
                    logger.error("generation failed: %s", output.error)
                    self.outcome = UNKNOWN_ERROR
                    self._emit("error", {"error": "generation_failed", "message": output.error or "generation failed"})
                else:
                    self.outcome = SUCCESS
                    elapsed = time.monotonic() - (first_token_at or started)
                    self._emit("done", {
                        "status": SUCCESS,
                        "finish_reason": output.finish_reason,
                        "message_id": self.message_id,
                        "usage": {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens},
                        "timing": {
                            "queue_s": round(started - received, 4),
                            "ttft_s": round((first_token_at or time.monotonic()) - started, 4),
                            "tokens_per_s": round(output.completion_tokens / elapsed, 2) if elapsed > 0 else None,
                        },
                    })
        except asyncio.CancelledError:
            if self._stream is not None:
                self._stream.cancel()
            self.outcome = DISCONNECTED_WHILE_STREAMING if streaming else DISCONNECTED_BEFORE_STREAMING
        except Exception:
            logger.exception("chat turn failed")
            if self._stream is not None:
                self._stream.cancel()
            self.outcome = UNKNOWN_ERROR
            self._emit("error", {"error": "internal_error", "message": "an unexpected error occurred"})
        finally:
            self.ticket.release()
            await self._finish(reply)

    async def _finish(self, reply: str) -> None:
        try:
            if reply:
                self.chat_prompt.add_responder_msg(reply)
            elif self.previous_reply is not None:
                self.chat_prompt.add_responder_msg(self.previous_reply)
            self.session.data["chat_prompt"] = self.chat_prompt.to_dict()
            await self.session.save()
        except Exception:
            logger.exception("saving the session failed")
            self.outcome = UNKNOWN_ERROR
        finally:
            await self.session.unlock()
            await self._call_back()
            self.events.put_nowait(None)

    async def _call_back(self) -> None:
        if self.callback is None:
            return
        try:
            result = self.callback(self.request, self.outcome or UNKNOWN_ERROR)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("the completion callback raised")

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        self.events.put_nowait((event, data))
