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
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..admission import Ticket
from ..conversation import ChatPrompt
from ..engine import GenerationStream, SamplingParams
from ..engine.protocol import accepts_messages
from ..errors import ChatError, ConversationTooLong, InvalidRequest, LeaseLost, NothingToRegenerate
from ..session import Lease, Session
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
from .turn_log import log_turn

if TYPE_CHECKING:
    from .chat_service import ChatService

logger = logging.getLogger("chatstream")

Callback = Callable[[Any, str], Any]

_LEASE_LOST = ("this reply stopped: its hold on the conversation ran out (this server or its session store stalled), "
               "so changes made meanwhile elsewhere are kept; of this turn only what was saved before then (its "
               "message and the reply up to its last checkpoint) is kept, marked stopped")


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
        # How a finished reply ended (kept with it in the history); sent only once the reply is saved,
        # so a failed save is an error, never done.
        self._done: Done | None = None
        self._ended = False  # a Failed was sent: the stream ends there
        self._ending = False  # the reply is being committed: checkpoints stop
        self._lease: Lease | None = None  # the conversation's lock while the turn holds it: it fences every write
        self._current_was: Any = ...  # the session's current conversation when the turn began
        # The first message that differs from the stored conversation: a save writes it and those
        # after it (after the first checkpoint, the reply alone), never the whole conversation.
        self._changed_from = 0
        self.failure: Failed | None = None  # how a reply that ended early failed (for the log line)

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

    @property
    def done(self) -> Done | None:
        """How the reply ended, once it ended normally (``None`` otherwise)."""
        return self._done

    @property
    def sent_text(self) -> str:
        """The part of the reply the face has handed to its client so far."""
        return self._sent

    def leaving(self, session_id: str, conversation_id: str | None = None) -> bool:
        """Whether this is a turn in that session (and conversation, when given) whose client went
        away: it ends by saving."""
        return (self._client_gone and self.session is not None and self.session.id == session_id
                and conversation_id in (None, self.conversation_id))

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
                        self._ending = True
                        checkpoints.cancel()
                        await asyncio.wait({checkpoints})
                    failure = await self._commit(chat_prompt, previous) if chat_prompt is not None else None
                    self._finish(failure)
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
            self._fail(Failed("internal_error", "an unexpected error occurred"))
        finally:
            if accepted:
                self.service._turn_ended(self)
                self.service.metrics.turns.labels(self.face, self.outcome or UNKNOWN_ERROR).inc()
                log_turn(self)
                await self._call_back()
                self._events.put_nowait(None)

    @contextlib.asynccontextmanager
    async def _session_lock(self) -> AsyncIterator[None]:
        if self.session is None:
            yield
            return
        service, session = self.service, self.session
        # The conversation's own lock: the user's other conversations may stream meanwhile.
        self.conversation_id, self._current_was = await service.start_conversation_id(session, self.conversation_id)
        service.enter_stream(session)
        session_id = session.id
        try:
            async with service.hold_conversation(session, self.conversation_id, on_lost=self._lease_lost,
                                                 streaming=True) as lease:
                self._lease = lease
                yield
        finally:
            self._lease = None
            service.leave_stream(session_id)

    def _lease_lost(self, reason: str) -> None:
        if reason == "store_unavailable":
            self.abort("store_unavailable", "this reply stopped: the session store stopped answering, so it cannot "
                                            "be saved")
        else:
            self.abort("lease_lost", _LEASE_LOST)

    async def _apply(self) -> tuple[ChatPrompt | None, str | None]:
        """Apply the turn to the stored conversation (in memory until committed)."""
        if self.session is None:
            return None, None
        chat_prompt = await self.service.load_conversation(self.session, self.conversation_id)
        self._changed_from = len(chat_prompt.messages)
        last = chat_prompt.messages[-1] if chat_prompt.messages else None
        if last is not None and (last.get("details") or {}).get("finish_reason") == "streaming":
            # A checkpoint whose writer died (we hold the lock now): that reply will never end.
            last["details"] = {"finish_reason": "stopped"}
            self._changed_from -= 1
        previous: str | None = None
        if self.regenerate:
            previous = chat_prompt.get_responder_last_msg()
            if not chat_prompt.clear_last_responder_message():
                raise NothingToRegenerate("there is no reply to regenerate in this conversation")
            self._changed_from = min(self._changed_from, len(chat_prompt.messages))
        else:
            if self.edit_index is not None:
                try:
                    chat_prompt.edit_user_message(self.edit_index, self.user_input or "")
                except IndexError as exc:
                    raise InvalidRequest(str(exc), param="edit_index") from None
                self._changed_from = min(self._changed_from, self.edit_index)
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

            def render() -> tuple[list[int], int]:
                # The shared head is tokenized once per process, here too: with --engine-url that is
                # the upstream's /tokenize, which held the event loop (and every lease) while it answered.
                ids = chat_prompt.render_ids(budget)
                return ids, self.service.shared_head_tokens(chat_prompt, ids)

            ids, shared = await self.service.run_bounded(render)
            if shared:
                self.params = replace(self.params, cache_shared_tokens=shared)
            return ids
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
                        self._done = Done(
                            finish_reason=output.finish_reason, message_id=self.message_id,
                            prompt_tokens=output.prompt_tokens or self.prompt_tokens,
                            completion_tokens=output.completion_tokens, logprobs=logprobs,
                            timing={
                                "queue_s": round(started - received, 4),
                                "ttft_s": round((first_token_at or time.monotonic()) - started, 4),
                                "tokens_per_s": round(output.completion_tokens / elapsed, 2) if elapsed > 0 else None,
                            },
                        )
                    elif output.finish_reason == "cancelled" and self._client_gone:
                        self.outcome = DISCONNECTED_WHILE_STREAMING
                    elif output.refused:  # the request's fault (an upstream refused a field): a client error
                        logger.info("request refused: %s", output.error)
                        self._fail(Failed("invalid_request", output.error or "the request was refused",
                                          param=output.error_param))
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
        self.failure = failure
        if not self._ended:
            self._ended = True
            self._events.put_nowait(failure)

    def _finish(self, failure: Failed | None) -> None:
        """Send the end of the stream: ``Done`` only if the reply was also saved."""
        if failure is not None:
            self._fail(failure)
        elif self._done is not None and not self._ended:
            self._ended = True  # nothing after done: a later failure (releasing the lock) is only logged
            self._events.put_nowait(self._done)

    async def _checkpoint(self, chat_prompt: ChatPrompt) -> None:
        """Save the reply as sent so far every ``checkpoint_interval_s`` while it streams.

        If this process dies mid-reply (killed, crashed), the conversation in the store still
        holds the reply up to the last checkpoint, and the session lock's lease frees the session.
        A checkpoint refused by the store's fence (the lease ran out) stops the turn. A regenerated
        reply is saved with its earlier answers (they stay stored until the first checkpoint
        replaces the message with one that carries them too).
        """
        assert self.session is not None
        saved = ""
        while True:
            await asyncio.sleep(self.service.checkpoint_interval_s)
            if self._sent == saved:
                continue
            saved = self._sent
            try:
                await self._save_partial(chat_prompt, saved)
            except LeaseLost as exc:
                logger.warning("turn %s stopped: %s", self.message_id, exc.message)
                self.abort(exc.code, _LEASE_LOST)
                return
            except Exception:
                logger.exception("saving a checkpoint of the reply failed")
            # A store client may lose the cancel that ends this loop (seen with redis-py after a CLIENT
            # PAUSE: this task stayed "cancelling" in its next sleep and the turn waited for it
            # forever), so the loop also stops by itself once the turn is ending.
            if self._ending:
                return

    async def _save_partial(self, chat_prompt: ChatPrompt, text: str) -> None:
        """Save the conversation with ``text`` as the reply in progress (with any earlier answers)."""
        assert self.session is not None and self.conversation_id is not None
        message = chat_prompt.reply_message(text)
        message["details"] = {"finish_reason": "streaming"}  # marked "stopped" by the next turn if its writer died
        await self.service.save_checkpoint(self.session, chat_prompt, message, self._changed_from,
                                           self.conversation_id, self._lease, self._current_was)
        self._changed_from = len(chat_prompt.messages)  # stored up to the reply: the next save rewrites the reply only

    async def _commit(self, chat_prompt: ChatPrompt, previous: str | None) -> Failed | None:
        """Write the reply into the history and save; exactly what the client was sent if it left.

        Returns why the save failed, if it did (the client then gets that, never ``Done``).
        """
        assert self.session is not None
        reply = self._sent if self._client_gone else self._generated
        if reply:
            chat_prompt.add_responder_msg(reply)
            chat_prompt.set_last_reply_details(self._details(reply))
        elif previous is not None:  # a regenerate that produced nothing keeps the old reply
            chat_prompt.add_responder_msg(previous)
        try:
            await self.service.save_conversation(self.session, chat_prompt, self.conversation_id, self._lease,
                                                 self._current_was, start=self._changed_from)
        except ChatError as exc:
            logger.error("saving the reply of turn %s failed: %s", self.message_id, exc.message)
            self.outcome = UNKNOWN_ERROR
            return Failed(exc.code, f"the reply could not be saved: {exc.message}")
        except Exception:
            logger.exception("saving the session failed")
            self.outcome = UNKNOWN_ERROR
            return Failed("save_failed", "the reply could not be saved")
        return None

    def _details(self, reply: str) -> dict[str, Any]:
        """How the reply ended, for the history (the UI shows it again after a reload)."""
        done = self._done
        if done is not None and reply == self._generated:
            return {"finish_reason": done.finish_reason, "completion_tokens": done.completion_tokens,
                    **{k: v for k, v in done.timing.items() if v is not None}}
        return {"finish_reason": "stopped" if self._client_gone else "error"}

    async def _call_back(self) -> None:
        if self.callback is None:
            return
        try:
            result = self.callback(self.request, self.outcome or UNKNOWN_ERROR)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("the completion callback raised")
