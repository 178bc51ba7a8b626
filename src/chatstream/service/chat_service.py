"""``ChatService``: the runtime every face shares.

It owns the engine and its lifecycle (load in the background, readiness, liveness, drain on
shutdown), the tokenizer, admission, the defaults and limits from the one :class:`Settings`, and
the conversation stored in a session. Faces build :class:`Turn` objects from it and only translate
its events and errors into their own wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

from ..admission import AdmissionQueue
from ..conversation import ChatPrompt
from ..engine import Engine, SamplingParams
from ..engine.protocol import engine_info
from ..errors import InvalidRequest, ModelNotReady, PromptTooLong, SessionBusy, SessionTooLarge, StoreUnavailable
from ..metrics import Metrics
from ..model_loader import GGUF_WEIGHTS, load_model, model_display_name
from ..session import Lease, MemorySessionStore, Session, SessionStore
from ..settings import Settings
from . import conversations
from .turn import Callback, Turn

logger = logging.getLogger("chatstream")

T = TypeVar("T")

# The conversation's key in session data (the seed API's name for it).
CONVERSATION_KEY = "chat_prompt"
# Replies one session may stream at once (in its different conversations), in all processes together.
MAX_PARALLEL_REPLIES = 4
# How long a change to a session's index of conversations waits for another one to finish.
_INDEX_WAIT_S = 2.0
# The session id /health reads to see that the store answers (no session has this id: ids are random).
_PROBE_ID = "chatstream-health-probe"
# The context when neither the settings nor the engine give one (the mock).
FALLBACK_CONTEXT_LEN = 4096
# Text averages about 4 characters a token; a message with more than 16 per token of the whole
# context cannot fit, so it is refused before it is tokenized.
CHARS_PER_TOKEN_BOUND = 16


class ChatService:
    """Engine, tokenizer, admission, defaults and limits: what every chat turn needs.

    Give a loaded ``model`` and ``tokenizer``, or an ``engine`` (and its tokenizer), or neither to
    load ``settings.model`` (default: the embedded model) in the background on :meth:`start`.
    ``settings.mock`` streams canned text without a model; ``settings.engine_url`` generates on
    OpenAI-compatible servers elsewhere (:class:`~chatstream.engine.remote.engine.RemoteEngine`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        model: Any = None,
        tokenizer: Any = None,
        engine: Engine | None = None,
        chat_prompt_clazz: type[ChatPrompt] = ChatPrompt,
        model_name: str | None = None,
        session_store: SessionStore | None = None,
    ) -> None:
        if model is not None and tokenizer is None:
            raise TypeError("pass the model's tokenizer with model=")
        if not (isinstance(chat_prompt_clazz, type) and issubclass(chat_prompt_clazz, ChatPrompt)):
            raise TypeError("chat_prompt_clazz must be a subclass of chatstream.ChatPrompt")
        self.settings = settings
        self.session_store: SessionStore = session_store or MemorySessionStore()
        self.chat_prompt_clazz = chat_prompt_clazz
        self.admission = AdmissionQueue(settings.concurrency, settings.queue_size)
        self.defaults = SamplingParams(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
        )
        # A session lock is a lease renewed while the turn runs: a crashed holder frees it this fast.
        self.lock_lease_s = settings.session_lease_s
        # How often a streaming reply is saved as it goes (what a killed process can lose at most).
        self.checkpoint_interval_s = 0.5
        self.tokenizer: Any = tokenizer
        self.engine: Engine | None = engine
        self.model_name = model_name or model_display_name(settings.model)
        self.load_error: str | None = None
        self.draining = False
        self._load_task: asyncio.Task[None] | None = None
        self._turns: set[Turn] = set()
        self._heads: dict[tuple[type, str | None], list[int]] = {}  # see shared_head_tokens
        # One lane for the turns' prompts, one for /tokenize: a flood of /tokenize never delays a turn.
        self._lanes: dict[str, asyncio.Semaphore] = {}
        self._lane_width = {"turns": 1, "tokenize": 1}
        self._streams: dict[str, int] = {}  # session id -> replies streaming in it
        self._last_progress = time.monotonic()
        self._last_stall = 0.0
        self.metrics = Metrics(self)
        if settings.mock and engine is None:
            from ..engine.mock import MockEngine, MockTokenizer

            self.tokenizer = tokenizer or MockTokenizer()
            self.engine = MockEngine(self.tokenizer, token_delay=settings.mock_token_delay)
            self.model_name = model_name or "mock"
        elif settings.engine_url and engine is None:
            self._attach_remote(tokenizer)
            self.model_name = model_name or settings.engine_model or "remote"
        elif engine is None and model is not None:
            self._attach(model, tokenizer)
        # With a remote engine and no name given, the name is the upstream's, known once it answers.
        self._name_from_engine = model_name is None and bool(settings.engine_url)
        self._settle_context_len()

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **parts: Any) -> ChatService:
        """The service for ``settings`` (default: from the environment); ``parts`` as for the constructor.

        The session store comes from ``settings.session_store`` (a URL) unless given in ``parts``.
        """
        settings = settings or Settings()
        if "session_store" not in parts and settings.session_store:
            from ..session import store_from_url

            parts["session_store"] = store_from_url(
                settings.session_store, settings.resolved_data_dir,
                max_session_bytes=settings.session_max_bytes, max_bytes=settings.session_store_max_bytes)
        return cls(settings, **parts)

    # -- engine lifecycle --
    def _attach(self, model: Any, tokenizer: Any) -> None:
        from ..engine.core.llm_engine import LLMEngine

        self.tokenizer = tokenizer
        settings = self.settings
        kv_mb = settings.kv_cache_mb
        self.engine = LLMEngine(
            model, tokenizer, max_num_seqs=settings.concurrency, device=settings.device,
            max_model_len=settings.context_len, kv_cache_memory_bytes=kv_mb * 2**20 if kv_mb else None,
            enable_prefix_caching=settings.prefix_caching,
            quantization=None if settings.quantization == "none" else settings.quantization,
            num_threads=settings.threads, kernels=settings.kernels, kv_cache_dtype=settings.kv_cache_dtype,
            forward_lanes=settings.forward_lanes,
        )

    def _attach_remote(self, tokenizer: Any) -> None:
        from ..engine.remote.engine import RemoteEngine
        from ..engine.remote.tokenizer import RemoteTokenizer, describe_counting, load_local_tokenizer

        settings = self.settings
        engine = RemoteEngine.from_settings(settings)
        self.engine = engine
        self.tokenizer = tokenizer or (load_local_tokenizer(settings.tokenizer) if settings.tokenizer
                                       else RemoteTokenizer(engine))
        if isinstance(self.tokenizer, RemoteTokenizer):
            # Counting waits on the upstream's /tokenize, not on this CPU: one slow answer must not
            # hold every other turn's prompt back.
            self._lane_width["turns"] = settings.concurrency + settings.queue_size
        logger.info("generating on %s; truncation counts tokens with %s", ", ".join(settings.engine_url),
                    describe_counting(self.tokenizer, settings.tokenizer))

    @property
    def context_len(self) -> int:
        """Prompt + reply token budget (settled once the engine is known)."""
        return self.settings.context_len or FALLBACK_CONTEXT_LEN

    @property
    def max_input_chars(self) -> int:
        """The character cap on a user message: ``--max-input-chars``, else derived from the context.

        Only a first bound: whether a message fits is decided by counting its tokens.
        """
        return self.settings.max_input_chars or self.context_len * CHARS_PER_TOKEN_BOUND

    def _settle_context_len(self) -> None:
        """With no ``context_len`` set: what the model supports, capped by what the KV cache holds."""
        if self.settings.context_len is not None or self.engine is None:
            return
        info = engine_info(self.engine)
        known = [info.max_model_len]
        blocks, block_size = info.num_blocks, info.block_size
        if isinstance(blocks, int) and isinstance(block_size, int):
            known.append(blocks * block_size)
        limits = [n for n in known if isinstance(n, int) and not isinstance(n, bool) and n > 0]
        # Nothing known: the mock's sane number, or for a remote engine the old default (set
        # --context-len to the upstream's own).
        context_len = min(limits) if limits else FALLBACK_CONTEXT_LEN if self.settings.mock else 1024
        update: dict[str, Any] = {"context_len": context_len}
        if self.settings.max_new_tokens >= context_len:  # a tiny KV budget: leave room for a prompt
            update["max_new_tokens"] = max(1, context_len // 2)
            self.defaults = replace(self.defaults, max_new_tokens=update["max_new_tokens"])
        logger.info("context: %d tokens (model: %s, KV cache: %s)", context_len, known[0], known[1:] or "n/a")
        self.settings = self.settings.model_copy(update=update)

    @property
    def ready(self) -> bool:
        return not self.draining and self.engine is not None and self.engine.ready

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if self.ready:
            return "ok"
        return "error" if self.load_error or self.engine_error else "loading"

    async def start(self) -> None:
        """Start the engine, or the model load if it was deferred. Idempotent; turns call it too."""
        if self.engine is None and self._load_task is None and self.load_error is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load())
        if self.engine is not None:
            await self.engine.start()
            if self._name_from_engine:
                self.model_name = engine_info(self.engine).model_name or self.model_name

    async def wait_ready(self) -> bool:
        """Wait for the background load; True if the engine is ready."""
        await self.start()
        if self._load_task is not None:
            await asyncio.wait({self._load_task})
        return self.ready

    async def _load(self) -> None:
        try:
            model, tokenizer = await asyncio.to_thread(
                load_model, self.settings.model, device=self.settings.device, dtype=self.settings.dtype,
                quantized=GGUF_WEIGHTS[self.settings.gguf_weights])
            self._attach(model, tokenizer)
            self._settle_context_len()
            assert self.engine is not None
            await self.engine.start()
            logger.info("model %s is ready", self.model_name)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the model failed")

    def check_ready(self) -> None:
        """Raise :class:`ModelNotReady` unless turns can be served now."""
        if self.ready:
            return
        if self.draining:
            raise ModelNotReady("the server is shutting down; retry on another instance or shortly",
                                code="shutting_down", retry_after=5)
        failure = self.load_error or self.engine_error
        if failure:
            raise ModelNotReady(f"the model is not available: {failure}", code="model_unavailable")
        raise ModelNotReady("the model is still loading; retry shortly", code="model_loading", retry_after=5)

    @property
    def engine_error(self) -> str | None:
        """Why the engine stopped working (it crashed), if it did."""
        error = engine_info(self.engine).error
        return error if isinstance(error, str) else None

    @property
    def live(self) -> bool:
        """False when the engine crashed, or a turn hit the stall deadline and the engine has
        produced nothing since (a stuck engine: restart the process)."""
        return self.engine_error is None and self._last_stall <= self._last_progress

    def note_progress(self) -> None:
        self._last_progress = time.monotonic()

    def note_stall(self) -> None:
        self._last_stall = time.monotonic()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop taking turns; let running ones finish for ``timeout_s``, then end the rest (saved)."""
        self.draining = True
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        running = [asyncio.ensure_future(turn.wait()) for turn in self._turns]  # no new ones come
        if running:
            await asyncio.wait(running, timeout=timeout_s)
        turns = list(self._turns)
        for turn in turns:
            turn.abort("server_shutting_down", "the server is shutting down; the reply so far was saved")
        if turns:
            await asyncio.wait([asyncio.ensure_future(t.wait()) for t in turns], timeout=10)

    async def shutdown(self) -> None:
        """Drain, then stop the engine."""
        if self._turns:
            await self.drain()
        self.draining = True
        if self.engine is not None:
            await self.engine.shutdown()
        await self.session_store.close()

    # -- health --
    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self.status,
            "model": self.model_name,
            "live": self.live,
            "running": self.admission.running,
            "waiting": self.admission.waiting,
            "concurrency": self.admission.concurrency,
            "queue_size": self.admission.queue_size,
        }
        if self.load_error or self.engine_error:
            body["error"] = self.load_error or self.engine_error
        info = engine_info(self.engine)
        if info.backend is not None:  # a local engine: the code path it runs
            body["backend"] = info.backend
        if info.num_blocks is not None:  # a local engine's KV cache (backend.kv_dtype: its element type)
            body["kv_cache"] = {"blocks": info.num_blocks, "block_size": info.block_size,
                                "bytes_per_token": info.kv_bytes_per_token}
        if info.upstreams is not None:  # a remote engine: each upstream's state
            body["upstreams"] = [upstream.state() for upstream in info.upstreams]
        return body

    async def check_store(self, timeout_s: float = 5.0) -> str | None:
        """Why the session store fails now, or None when it answers (a read, bounded by ``timeout_s``).

        Asked on every ``/health``, so readiness follows the store down and back up without a restart.
        """
        store = self.session_store
        try:
            async with asyncio.timeout(timeout_s):
                await store.get(_PROBE_ID)
        except TimeoutError:
            return f"the session store did not answer within {timeout_s:g} s"
        except StoreUnavailable as exc:
            return exc.message
        except Exception as exc:  # a custom store's own failure
            return f"{type(exc).__name__}: {exc}"
        return None

    # -- limits --
    @property
    def vocab_size(self) -> int | None:
        try:
            return len(self.tokenizer) if self.tokenizer is not None else None
        except TypeError:  # a tokenizer without __len__ (the mock's): no bound to check
            return None

    async def run_bounded(self, fn: Callable[..., T], *args: Any, lane: str = "turns") -> T:
        """Run CPU-heavy preparation (rendering, tokenizing) off the event loop, one at a time per lane.

        One at a time: a flood of large requests then waits here instead of starving the event
        loop of the GIL with many threads. ``lane="tokenize"`` (the ``/tokenize`` route) waits
        apart from the turns' prompts (``"turns"``): two 4 MiB /tokenize calls held other users'
        turns back 7.5 s when they shared one slot.
        """
        slots = self._lanes.get(lane)
        if slots is None:
            slots = self._lanes[lane] = asyncio.Semaphore(self._lane_width.get(lane, 1))
        async with slots:
            return await asyncio.to_thread(fn, *args)

    def render_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a whole stateless conversation (nothing is dropped)."""
        prompt = self.chat_prompt_clazz(tokenizer=self.tokenizer)
        try:
            text = prompt.render(messages, add_generation_prompt=True)
        except Exception as exc:  # e.g. a chat template that refuses this order of roles
            raise InvalidRequest(f"the messages cannot be rendered with the model's chat template: {exc}",
                                 param="messages") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def forwards_requests(self) -> bool:
        """True when the engine sends each request on to an OpenAI-compatible upstream (``--engine-url``),
        which renders the prompt from the messages and enforces ``response_format``, ``logit_bias``
        and ``logprobs`` itself."""
        return bool(getattr(self.engine, "forwards", False))

    def cannot_honour(self, params: SamplingParams) -> str | None:
        """The first of ``grammar``, ``logit_bias``, ``logprobs`` that ``params`` asks for and the
        engine cannot honour (the mock engine; a remote one for a grammar with no ``response_format``
        to send); None when all is well or no engine is up yet."""
        if self.engine is None or getattr(self.engine, "constrains", False):
            return None
        forwards = self.forwards_requests
        asked = {"grammar": params.grammar is not None and not (forwards and params.response_format is not None),
                 "logit_bias": bool(params.logit_bias) and not forwards,
                 "logprobs": params.logprobs is not None and not forwards}
        return next((name for name, on in asked.items() if on), None)

    def fit_to_context(self, params: SamplingParams, prompt_tokens: int, explicit_max_tokens: bool) -> SamplingParams:
        """Shorten the reply to what the context leaves, or refuse a prompt that leaves too little."""
        room = self.context_len - prompt_tokens
        if room >= params.max_new_tokens or (room >= 1 and not explicit_max_tokens):
            return params if room >= params.max_new_tokens else replace(params, max_new_tokens=room)
        raise PromptTooLong(
            f"the prompt has {prompt_tokens} tokens and the reply may have {params.max_new_tokens}; "
            f"the context holds {self.context_len}",
            prompt_tokens=prompt_tokens, limit=self.context_len,
        )

    # -- conversations in sessions (an index, and each conversation on its own: see service/conversations.py) --
    async def read_index(self, session: Session) -> dict[str, Any]:
        """The session's index of conversations, read without a lock (nothing is written)."""
        data = {} if session.unseen else (await session.store.get(session.id)) or {}
        conversations.migrate(data)
        return data

    async def update_index(self, session: Session, change: Callable[[dict[str, Any]], T],
                           wait_s: float = _INDEX_WAIT_S) -> T:
        """Apply ``change`` to a fresh read of the index under the session's lock, and save it.

        The lock is held for this only (milliseconds), and waited for ``wait_s``: changes to the
        index from several conversations' turns never overwrite each other.
        """
        async with session.lock(lease_s=self.lock_lease_s, wait_s=wait_s):
            session.loaded = False  # a fresh read: another request may have changed it
            data = await session.load()
            for conversation_id, stored in conversations.split_legacy(data).items():
                # An older layout, split on its first change; a conversation already stored on its own
                # (a turn saves its messages before the index) is newer than the copy in the index.
                if await session.get_part(conversation_id) is None:
                    await session.put_part(conversation_id, stored, None, migrating=True)
            result = change(data)
            await session.save()
            return result

    async def resolve_conversation(self, session: Session, conversation_id: str | None, *, create: bool) -> str | None:
        """The id a request means: the one given (which must exist), else the current one (created
        if there is none and ``create``)."""
        index = await self.read_index(session)
        target = conversations.resolve(index, conversation_id, create=False)
        if target is None and create:
            target = await self.update_index(
                session, lambda data: conversations.resolve(data, None, create=True))
        return target

    async def start_conversation_id(self, session: Session, conversation_id: str | None) -> tuple[str, Any]:
        """The conversation a turn writes into: the one given (which must exist), else the current
        one, else a new id that enters the index with the turn's first save (a refused turn creates
        nothing); and which conversation is current now (see :func:`conversations.note_chat_prompt`)."""
        index = await self.read_index(session)
        target = conversations.resolve(index, conversation_id, create=False)
        if target is None and conversation_id is None and await self._wait_for_leaving(session.id):
            # The user's previous turn, left mid-reply (or stopped), may be saving the conversation it
            # started: this turn goes on in it, rather than start a second one that the first's save
            # would then hide (the current one is the first saved; a reload showed this turn missing).
            index = await self.read_index(session)
            target = conversations.resolve(index, conversation_id, create=False)
        if target is None:
            conversations.check_room(index)
            target = conversations.new_id()
        return target, index.get(conversations.CURRENT_KEY)

    async def read_chat_prompt_data(self, session: Session, conversation_id: str,
                                    index: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """One conversation's stored messages (``{"system", "messages", "context_start"?}``)."""
        index = index if index is not None else await self.read_index(session)
        entry = conversations.get(index, conversation_id)
        stored = await session.get_part(conversation_id)
        return stored if stored is not None else conversations.legacy_chat_prompt(entry)

    async def load_conversation(self, session: Session, conversation_id: str | None = None) -> ChatPrompt:
        """The conversation ``conversation_id`` (default: the current one, created if there is none).

        An id not in the index yet is a conversation a turn is starting: it is empty.
        """
        target = conversation_id or await self.resolve_conversation(session, None, create=True) or ""
        index = await self.read_index(session)
        known = target in (index.get(conversations.CONVERSATIONS_KEY) or {})
        stored = await self.read_chat_prompt_data(session, target, index) if known else None
        if known and conversations.legacy_chat_prompt(conversations.get(index, target)) is not None:
            # An older layout kept it in the index: a turn changes it, so it is split out first
            # (a save then writes only the messages that change).
            await self.update_index(session, lambda data: None)
            stored = await session.get_part(target)
        prompt = self.chat_prompt_clazz.from_dict(
            stored if isinstance(stored, dict) else None, tokenizer=self.tokenizer, system=self.settings.system_prompt,
        )
        entry = conversations.get(index, target) if known else None
        settings = conversations.effective_settings(index, entry)
        if "system_prompt" in settings:  # the conversation's (or user's) system prompt wins over the stored one
            prompt.system = settings["system_prompt"] or None
        return prompt

    async def save_conversation(self, session: Session, chat_prompt: ChatPrompt,
                                conversation_id: str | None = None, lease: Lease | None = None,
                                current_was: Any = ..., start: int = 0) -> None:
        """Store the conversation's messages (fenced by ``lease``, its lock), then note it in the index.

        ``start``: the first message that changed since the conversation was loaded (or last saved);
        only those are written, the stored ones before it stay as they are."""
        target = conversation_id or await self.resolve_conversation(session, None, create=True) or ""
        head, changed = chat_prompt.to_rows(start)
        await session.put_messages(target, head, start, changed, lease)
        session.get_session()[CONVERSATION_KEY] = chat_prompt  # what the seed API's callback reads
        seen = {"messages": chat_prompt.messages}  # read (count, title), not copied
        try:
            # Waited for past a lease: a live holder keeps the index lock for milliseconds, so one held
            # longer is a process that died or stalled holding it, and its lease frees it. Given up
            # sooner, a conversation the turn started would be saved but missing from the list.
            await self.update_index(
                session, lambda index: conversations.note_chat_prompt(index, target, seen, current_was),
                wait_s=self.lock_lease_s + _INDEX_WAIT_S)
        except (SessionBusy, SessionTooLarge) as exc:  # the messages are saved; only the list's title/count/time lag behind
            logger.warning("the index of session %s… was not updated (%s); conversation %s saved without it",
                           session.id[:8], exc.code, target)

    async def save_checkpoint(self, session: Session, chat_prompt: ChatPrompt, reply: dict[str, Any], start: int,
                              conversation_id: str, lease: Lease | None, current_was: Any = ...) -> None:
        """Save a reply in progress: the messages from ``start`` on (after the first checkpoint, the
        reply alone), and the index only for a conversation the turn started."""
        head, changed = chat_prompt.to_rows(start)
        await session.put_messages(conversation_id, head, start, [*changed, reply], lease)
        entry = ((await self.read_index(session)).get(conversations.CONVERSATIONS_KEY) or {}).get(conversation_id)
        stored = len(chat_prompt.messages) + 1
        if not isinstance(entry, dict) or entry.get("message_count") != stored:
            # The turn's first checkpoint (the count changes then only): the list counts what is
            # stored even if this turn never commits (its process dies, or its lease runs out).
            seen = {"messages": [*chat_prompt.messages, reply]}
            await self.update_index(
                session, lambda index: conversations.note_chat_prompt(index, conversation_id, seen, current_was))

    async def conversation_sampling(self, session: Session, conversation_id: str | None = None) -> dict[str, Any]:
        """The conversation's sampling settings under the engine's names (overrides of the defaults)."""
        index = await self.read_index(session)
        target = conversations.resolve(index, conversation_id, create=False)
        entry = conversations.get(index, target) if target is not None else None
        return conversations.sampling_values(conversations.effective_settings(index, entry))

    async def history(self, session: Session, conversation_id: str | None = None,
                      details: bool = False) -> list[dict[str, Any]]:
        """The messages; with ``details``, also how each reply ended (what the UI shows under it)."""
        index = await self.read_index(session)
        target = conversations.resolve(index, conversation_id, create=False)
        if target is None:
            return []
        stored = await self.read_chat_prompt_data(session, target, index)
        messages = self.chat_prompt_clazz.from_dict(stored if isinstance(stored, dict) else None).messages
        if not details:
            for message in messages:
                message.pop("details", None)
                message.pop("alternative_details", None)
        elif _streaming(messages) and not await session.part_held(target):
            # A reply marked streaming whose conversation nobody holds lost its writer (the process
            # died, or stalled past its lease: it can write nothing more): it is stopped, as the next
            # turn will store it. Read again first: the writer may have saved its end and let go meanwhile.
            stored = await self.read_chat_prompt_data(session, target, index)
            messages = self.chat_prompt_clazz.from_dict(stored if isinstance(stored, dict) else None).messages
            if _streaming(messages):
                messages[-1]["details"] = {"finish_reason": "stopped"}
        return messages

    @contextlib.asynccontextmanager
    async def hold_conversation(self, session: Session, conversation_id: str,
                                on_lost: Callable[[str], None] | None = None,
                                streaming: bool = False) -> AsyncIterator[Lease]:
        """The conversation's own lock; :class:`SessionBusy` naming it while a reply is written into it.

        ``streaming`` (a turn): also refused while the session streams ``MAX_PARALLEL_REPLIES``
        replies, counted in the store with the locks, so the limit holds across processes."""
        busy = (f"a reply is already being generated in conversation {conversation_id!r}; "
                "wait for it to finish or stop it")
        # A turn here whose client left (or pressed Stop) is saving what it sent: the next turn waits
        # for that (milliseconds; longer on a busy machine) rather than answer 409 to a client that
        # already let go.
        await self._wait_for_leaving(session.id, conversation_id)
        async with session.hold(conversation_id, self.lock_lease_s, busy, on_lost,
                                MAX_PARALLEL_REPLIES if streaming else None) as lease:
            yield lease

    async def _wait_for_leaving(self, session_id: str, conversation_id: str | None = None) -> bool:
        """Wait, up to the lease, for this process's turns in the session (in that conversation, when
        given) whose client went away: they end by saving. Whether there were any."""
        leaving = [asyncio.ensure_future(turn.wait()) for turn in self._turns
                   if turn.leaving(session_id, conversation_id)]
        if leaving:
            _, pending = await asyncio.wait(leaving, timeout=self.lock_lease_s)
            for waiter in pending:
                waiter.cancel()
        return bool(leaving)

    async def clear_conversation(self, session: Session, conversation_id: str | None = None) -> None:
        """Without an id: empty the session and give it a new id (a new cookie), as always.

        With an id: empty that conversation's messages only (its title and settings stay).
        """
        if conversation_id is not None:
            if session.is_new:
                raise conversations.ConversationNotFound(f"there is no conversation {conversation_id!r} in this session")
            conversations.get(await self.read_index(session), conversation_id)
            async with self.hold_conversation(session, conversation_id) as lease:
                await session.put_part(conversation_id, {"messages": []}, lease)
                await self.update_index(
                    session, lambda index: conversations.note_chat_prompt(index, conversation_id, {"messages": []}))
            return
        if session.is_new:
            return  # nothing stored: create nothing
        async with contextlib.AsyncExitStack() as held:
            await held.enter_async_context(session.lock(lease_s=self.lock_lease_s))
            index = await self.read_index(session)
            leases = [await held.enter_async_context(self.hold_conversation(session, cid))
                      for cid in index.get(conversations.CONVERSATIONS_KEY) or {}]
            for cid, lease in zip(index.get(conversations.CONVERSATIONS_KEY) or {}, leases):
                await session.delete_part(cid, lease)
            await session.clear()
        await session.rotate()

    def enter_stream(self, session: Session) -> None:
        """Count a reply streaming in ``session``; :class:`SessionBusy` past the per-session limit."""
        running = self._streams.get(session.id, 0)
        if running >= MAX_PARALLEL_REPLIES:
            raise SessionBusy(f"{MAX_PARALLEL_REPLIES} replies are already being generated in this session "
                              "(the most one user may run at once); wait for one to finish")
        self._streams[session.id] = running + 1

    def leave_stream(self, session_id: str) -> None:
        running = self._streams.get(session_id, 0) - 1
        if running > 0:
            self._streams[session_id] = running
        else:
            self._streams.pop(session_id, None)

    # -- turns --
    def session_turn(
        self,
        session: Session,
        params: SamplingParams,
        *,
        user_input: str | None = None,
        regenerate: bool = False,
        request: Any = None,
        callback: Callback | None = None,
        face: str = "chat_stream",
        conversation_id: str | None = None,
    ) -> Turn:
        """A turn of the conversation kept in ``session`` (``regenerate`` answers the last user turn again).

        ``conversation_id`` picks one of the session's conversations (default: the current one).
        """
        params = self._cache_scoped(params, f"session:{session.id}")
        turn = Turn(self, params, session=session, user_input=user_input, regenerate=regenerate,
                    request=request, callback=callback, face=face)
        turn.conversation_id = conversation_id
        return turn

    def stateless_turn(self, messages: list[dict[str, Any]], params: SamplingParams, *,
                       explicit_max_tokens: bool = True, user: str | None = None,
                       render: Callable[[list[dict[str, Any]]], list[int]] | None = None) -> Turn:
        """A turn over ``messages`` given whole (the OpenAI API): nothing is read or saved.

        ``user`` (OpenAI's end-user id) scopes the prefix cache: API requests share cached
        prefixes only with API requests of the same ``user`` (all without one share one scope).
        ``render`` turns them into prompt ids (default :meth:`render_messages`); the OpenAI face
        passes its own for tools and for ``/v1/completions``' raw prompts. It runs off the loop.
        """
        params = self._cache_scoped(params, f"api:{user or ''}")
        return Turn(self, params, messages=messages, explicit_max_tokens=explicit_max_tokens, face="openai",
                    render=render)

    def _cache_scoped(self, params: SamplingParams, user: str) -> SamplingParams:
        """``params`` whose prompt shares prefix-cache blocks only with ``user``'s other requests.

        Shared across users, a cached prefix answers "did anyone send this text?" to whoever sends
        it too (it is faster and counts more hit tokens): a guessed PIN was found in 100 tries.
        """
        return params if self.settings.shared_prefix_cache else replace(params, cache_salt=user)

    def shared_head_tokens(self, chat_prompt: ChatPrompt, ids: list[int]) -> int:
        """How many of ``ids``' leading tokens may share prefix-cache blocks across users: the chat
        template's head and the server's system prompt, which hold nothing a user wrote. Without
        this, every session's cache scope recomputed them for every prompt (16 /chat_stream clients:
        all 45 prompt tokens of each request; 29 with the head's full block shared). A conversation
        with its own system prompt shares nothing."""
        if chat_prompt.system != self.settings.system_prompt:
            return 0
        key = (type(chat_prompt), chat_prompt.system)
        head = self._heads.get(key)
        if head is None:
            try:
                head = chat_prompt.head_ids()
            except Exception:  # a custom ChatPrompt's render may not take a lone user message: share nothing
                logger.exception("rendering the prompt's shared head failed")
                head = []
            self._heads[key] = head
        return len(head) if ids[: len(head)] == head else 0

    def _turn_started(self, turn: Turn) -> None:
        self._turns.add(turn)

    def _turn_ended(self, turn: Turn) -> None:
        self._turns.discard(turn)


def _streaming(messages: list[dict[str, Any]]) -> bool:
    """Whether the last message is a reply saved while it streamed (a checkpoint)."""
    return bool(messages) and (messages[-1].get("details") or {}).get("finish_reason") == "streaming"
