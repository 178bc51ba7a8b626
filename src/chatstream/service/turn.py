"""One chat turn, from the session lock to the completion callback, written once for every face.

``await turn.start()`` takes the session lock, applies the turn to the conversation (a new user
message, or dropping the last reply to regenerate), renders a prompt that fits the context and
takes a place in the admission queue. It raises a :class:`~chatstream.errors.ChatError` if any of
that is refused, and then nothing has changed. After it returns, the turn runs as its own task and
:meth:`Turn.events` yields what the face sends: queue positions, text deltas, then ``Done`` or
``Failed``. Whatever happens (success, client gone while queued or mid-stream, engine error or
stall, server shutdown) one ``finally`` releases the slot, writes the reply (or exactly the part
the client was sent) to the history, saves the session, releases the lock and calls the callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ..admission import Ticket
from ..conversation import ChatPrompt
from ..engine import GenerationStream, SamplingParams
from ..engine.protocol import accepts_messages
from ..errors import ChatError, ConversationTooLong, InvalidRequest, NothingToRegenerate
from ..session import Session
from .events import (
    DISCONNECTED_BEFORE_STREAMING,
    DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
    Delta,
    Done,
    Failed,
    Queued,
    TurnEvent,
)

if TYPE_CHECKING:
    from .chat_service import ChatService

logger = logging.getLogger("chatstream")

Callback = Callable[[Any, str], Any]


class Turn:
    """One chat turn. Build it with :meth:`ChatService.session_turn` or :meth:`ChatService.stateless_turn`."""

    def __init__(
        self,
        service: ChatService,
        params: SamplingParams,
        *,
        session: Session | None = None,
        user_input: str | None = None,
        regenerate: bool = False,
        messages: list[dict[str, str]] | None = None,
        request: Any = None,
        callback: Callback | None = None,
        explicit_max_tokens: bool = True,
        face: str = "chat_stream",
        render: Callable[[list[dict[str, Any]]], list[int]] | None = None,
    ) -> None:
        if (session is None) == (messages is None):
            raise TypeError("a turn needs a session (stateful) or messages (stateless), not both")
        self.service = service
        self.params = params
        self.session = session
        self.user_input = user_input
        self.regenerate = regenerate
        self.messages = messages
        self.request = request
        self.callback = callback
        self.explicit_max_tokens = explicit_max_tokens  # stateless: False lets the reply shrink to fit
        self.face = face  # which face runs it, for metrics
        self.render = render  # stateless: how ``messages`` become prompt ids (default: the chat template)
        self.message_id = uuid.uuid4().hex
        self.conversation_id: str | None = None  # which of the session's conversations (None: the current one)
        self.edit_index: int | None = None  # a user message that this turn's input replaces (the rest is dropped)
        self.outcome: str | None = None
        self.prompt_ids: list[int] = []
        self.prompt_tokens = 0
        self.prompt_messages: list[dict[str, str]] = []  # what the prompt was rendered from
        self._events: asyncio.Queue[TurnEvent | None] = asyncio.Queue()
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._generation: asyncio.Task[None] | None = None
        self._stream: GenerationStream | None = None
        self._generated = ""  # all text the engine produced
        self._sent = ""  # the part of it the face has handed to its client
        self._client_gone = False
        self._abort: Failed | None = None

    # -- the face's side --
    async def start(self) -> None:
        """Lock, apply, render, admit. Raises a ``ChatError`` (nothing changed) if refused."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            await asyncio.shield(self._accepted)
        except asyncio.CancelledError:  # the client left while we prepared: undo everything
            self._client_gone = True
            self._task.cancel()
            raise

    async def events(self) -> AsyncGenerator[TurnEvent, None]:
        """What to send, in order; ends after ``Done`` or ``Failed``."""
        while (event := await self._events.get()) is not None:
            yield event
            if isinstance(event, Delta):  # the consumer came back for more: this one was sent
                self._sent += event.text

    def cancel(self) -> None:
        """The client went away: leave the queue, or stop generating, and save at once."""
        self._client_gone = True
        if self._generation is not None and not self._generation.done():
            self._generation.cancel()

    def abort(self, code: str, message: str) -> None:
        """The server ends this turn (shutting down): the client gets a ``Failed`` event."""
        if self._abort is None:
            self._abort = Failed(code, message)
        if self._generation is not None and not self._generation.done():
            self._generation.cancel()

    async def wait(self) -> None:
        """Until the turn has fully ended (saved, unlocked, called back)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    # -- the turn itself --
    async def _run(self) -> None:
        accepted = False
        try:
            self.service.check_ready()
            async with self._session_lock():
                chat_prompt, previous = await self._apply()
                self.prompt_ids = await self._render(chat_prompt)
                self.prompt_messages = chat_prompt.kept_messages() if chat_prompt is not None else list(self.messages or [])
                self.prompt_tokens = len(self.prompt_ids)
                self.service.check_ready()
                ticket = self.service.admission.try_enter()
                accepted = True
                self._accepted.set_result(None)
                self.service._turn_started(self)
                loop = asyncio.get_running_loop()
                checkpoints = loop.create_task(self._checkpoint(chat_prompt)) if chat_prompt is not None else None
                try:
                    self._generation = loop.create_task(self._generate(ticket))
                    await asyncio.wait({self._generation})
                finally:
                    ticket.release()
                    if checkpoints is not None:
                        checkpoints.cancel()
                        await asyncio.wait({checkpoints})
                    if chat_prompt is not None:
                        await self._commit(chat_prompt, previous)
        except BaseException as exc:
            if not accepted:  # refused: the in-memory conversation is dropped, nothing was saved
                if isinstance(exc, asyncio.CancelledError):
                    self._accepted.cancel()
                    return  # start() was cancelled and re-raises for the face
                if isinstance(exc, ChatError):
                    self.service.metrics.refused.labels(self.face, exc.code).inc()
                if not self._accepted.done():
                    self._accepted.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            logger.exception("chat turn failed")
            self.outcome = UNKNOWN_ERROR
            self._events.put_nowait(Failed("internal_error", "an unexpected error occurred"))
        finally:
            if accepted:
                self.service._turn_ended(self)
                self.service.metrics.turns.labels(self.face, self.outcome or UNKNOWN_ERROR).inc()
                await self._call_back()
                self._events.put_nowait(None)

    @contextlib.asynccontextmanager
    async def _session_lock(self) -> AsyncIterator[None]:
        if self.session is None:
            yield
            return
        async with self.session.lock(lease_s=self.service.lock_lease_s):
            yield

    async def _apply(self) -> tuple[ChatPrompt | None, str | None]:
        """Apply the turn to the stored conversation (in memory until committed)."""
        if self.session is None:
            return None, None
        chat_prompt = await self.service.load_conversation(self.session, self.conversation_id)
        previous: str | None = None
        if self.regenerate:
            previous = chat_prompt.get_responder_last_msg()
            if not chat_prompt.clear_last_responder_message():
                raise NothingToRegenerate("there is no reply to regenerate in this conversation")
        else:
            if self.edit_index is not None:
                try:
                    chat_prompt.edit_user_message(self.edit_index, self.user_input or "")
                except IndexError as exc:
                    raise InvalidRequest(str(exc), param="edit_index") from None
                return chat_prompt, previous
            limit = self.service.settings.max_history_messages
            if len(chat_prompt.messages) + 2 > limit:
                raise ConversationTooLong(
                    f"this conversation has reached {limit} messages: clear it (or start a new one) to go on"
                )
            chat_prompt.add_requester_msg(self.user_input or "")
        return chat_prompt, previous

    async def _render(self, chat_prompt: ChatPrompt | None) -> list[int]:
        if chat_prompt is not None:
            budget = self.service.context_len - self.params.max_new_tokens
            return await self.service.run_bounded(chat_prompt.render_ids, budget)
        assert self.messages is not None
        ids = await self.service.run_bounded(self.render or self.service.render_messages, self.messages)
        self.params = self.service.fit_to_context(self.params, len(ids), self.explicit_max_tokens)
        return ids

    async def _generate(self, ticket: Ticket) -> None:
        """Queue, then stream from the engine. Never raises: the outcome says how it ended."""
        settings = self.service.settings
        received = time.monotonic()
        streaming = False
        try:
            async with asyncio.timeout(settings.queue_timeout_s):
                await ticket.wait(lambda position: self._events.put_nowait(Queued(position)))
        except TimeoutError:
            self._fail(Failed("queue_timeout", f"no generation slot became free within {settings.queue_timeout_s:g} s"))
            return
        except asyncio.CancelledError:
            self._end_cancelled(streaming)
            return
        streaming = True
        started = time.monotonic()
        metrics = self.service.metrics
        metrics.queue_wait.observe(started - received)
        first_token_at: float | None = None
        logprobs: tuple[dict[str, Any], ...] = ()  # of tokens whose text is not out yet
        loop = asyncio.get_running_loop()
        assert self.service.engine is not None
        engine = self.service.engine
        extra = {"messages": self.prompt_messages} if accepts_messages(engine) else {}  # a remote engine sends them
        self._stream = stream = engine.generate(self.prompt_ids, self.params, request_id=self.message_id, **extra)
        try:
            async with asyncio.timeout(settings.stall_timeout_s) as deadline:
                async for output in stream:
                    deadline.reschedule(loop.time() + settings.stall_timeout_s)
                    self.service.note_progress()
                    logprobs = (*logprobs, *output.logprobs) if output.logprobs else logprobs
                    if output.text:
                        if first_token_at is None:
                            first_token_at = time.monotonic()
                            metrics.ttft.observe(first_token_at - started)
                        self._generated += output.text
                        self._events.put_nowait(Delta(output.text, logprobs))
                        logprobs = ()
                    if not output.finished:
                        continue
                    if output.finish_reason in ("stop", "length"):
                        self.outcome = SUCCESS
                        elapsed = time.monotonic() - (first_token_at or started)
                        metrics.prompt_tokens.inc(output.prompt_tokens or self.prompt_tokens)
                        metrics.generation_tokens.inc(output.completion_tokens)
                        if output.completion_tokens > 1:
                            metrics.tpot.observe(elapsed / (output.completion_tokens - 1))
                        self._events.put_nowait(Done(
                            finish_reason=output.finish_reason, message_id=self.message_id,
                            prompt_tokens=output.prompt_tokens or self.prompt_tokens,
                            completion_tokens=output.completion_tokens, logprobs=logprobs,
                            timing={
                                "queue_s": round(started - received, 4),
                                "ttft_s": round((first_token_at or time.monotonic()) - started, 4),
                                "tokens_per_s": round(output.completion_tokens / elapsed, 2) if elapsed > 0 else None,
                            },
                        ))
                    elif output.finish_reason == "cancelled" and self._client_gone:
                        self.outcome = DISCONNECTED_WHILE_STREAMING
                    else:
                        logger.error("generation failed: %s", output.error or output.finish_reason)
                        self._fail(Failed("generation_failed", output.error or f"the generation ended: {output.finish_reason}"))
        except TimeoutError:
            stream.cancel()
            self.service.note_stall()
            logger.error("the engine produced nothing for %s s: ending turn %s", settings.stall_timeout_s, self.message_id)
            self._fail(Failed("engine_timeout", f"the model produced nothing for {settings.stall_timeout_s:g} s"))
        except asyncio.CancelledError:
            stream.cancel()  # the engine drops it before its next step; we do not wait for that
            self._end_cancelled(streaming)

    def _end_cancelled(self, streaming: bool) -> None:
        if self._abort is not None and not self._client_gone:
            self._fail(self._abort)
        else:
            self.outcome = DISCONNECTED_WHILE_STREAMING if streaming else DISCONNECTED_BEFORE_STREAMING

    def _fail(self, failure: Failed) -> None:
        self.outcome = UNKNOWN_ERROR
        self._events.put_nowait(failure)

    async def _checkpoint(self, chat_prompt: ChatPrompt) -> None:
        """Save the reply as sent so far every ``checkpoint_interval_s`` while it streams.

        If this process dies mid-reply (killed, crashed), the conversation in the store still
        holds the reply up to the last checkpoint, and the session lock's lease frees the session.
        """
        assert self.session is not None
        saved = ""
        while True:
            await asyncio.sleep(self.service.checkpoint_interval_s)
            if self._sent == saved:
                continue
            saved = self._sent
            data = chat_prompt.to_dict()
            data["messages"].append({"role": "assistant", "content": saved})
            try:
                await self.service.save_conversation_data(self.session, data, self.conversation_id)
            except Exception:
                logger.exception("saving a checkpoint of the reply failed")

    async def _commit(self, chat_prompt: ChatPrompt, previous: str | None) -> None:
        """Write the reply into the history and save; exactly what the client was sent if it left."""
        assert self.session is not None
        reply = self._sent if self._client_gone else self._generated
        if reply:
            chat_prompt.add_responder_msg(reply)
        elif previous is not None:  # a regenerate that produced nothing keeps the old reply
            chat_prompt.add_responder_msg(previous)
        try:
            await self.service.save_conversation(self.session, chat_prompt, self.conversation_id)
        except Exception:
            logger.exception("saving the session failed")
            self.outcome = UNKNOWN_ERROR

    async def _call_back(self) -> None:
        if self.callback is None:
            return
        try:
            result = self.callback(self.request, self.outcome or UNKNOWN_ERROR)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("the completion callback raised")
