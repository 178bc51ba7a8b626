"""Signed-cookie sessions with data kept server-side.

The cookie carries only a random session id signed with the server's secret. A missing,
garbage, expired or tampered cookie simply means a fresh session: never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from http.cookies import SimpleCookie
from typing import Any

from itsdangerous import BadSignature, TimestampSigner
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ChatError, SessionBusy
from .lease import Lease
from .memory_store import MemorySessionStore
from .store import SessionData, SessionStore


class TooManySessions(ChatError):
    """This client started too many new sessions lately (a cookieless flood)."""

    code = "too_many_sessions"

logger = logging.getLogger("chatstream.session")

SECRET_ENV = "CHATSTREAM_SESSION_SECRET"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32,64}$")
DEFAULT_LEASE_S = 30.0


class Session:
    """One client's session: ``data`` is what is stored; ``get_session()`` is the seed API's view.

    ``get_session()`` returns a dict of live objects (e.g. ``"chat_prompt"``) that the layers
    above rebuild from ``data`` and write back before saving.
    """

    def __init__(
        self,
        store: SessionStore,
        session_id: str,
        is_new: bool,
        ttl_s: int,
        admit_new: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.id = session_id
        self.is_new = is_new
        self.ttl_s = ttl_s
        self.data: SessionData = {}
        self.loaded = False
        # A new session's cookie is only sent once something was stored: requests that change
        # nothing create no session.
        self.used = False
        self._admit_new = admit_new
        self._claimed = not is_new
        self._view: dict[str, Any] = {}
        self._lease: Lease | None = None
        # Called (once) when the lock's lease runs out while held: the holder must stop writing.
        # Its argument says why: "expired" (a stall) or "store_unavailable" (renewals kept failing).
        self.on_lease_lost: Callable[[str], None] | None = None

    @property
    def unseen(self) -> bool:
        """Nothing can be stored under this id yet: a new session this request has not locked or
        written (once it has, parallel requests with its new cookie may write too, so reads go to the store)."""
        return self.is_new and not self.used

    def get_session(self) -> dict[str, Any]:
        return self._view

    async def load(self) -> SessionData:
        if not self.loaded:
            self.data = ({} if self.unseen else await self.store.get(self.id)) or {}
            self.loaded = True
        return self.data

    async def save(self) -> None:
        """Store ``data``; while this request holds the lock, fenced by its token (:class:`LeaseLost`
        if the lease ran out meanwhile: then nothing is written)."""
        self.used = True
        await self.store.set(self.id, self.data, self.ttl_s, fence=self._fence())

    async def clear(self) -> None:
        await self.store.delete(self.id, fence=self._fence())
        self.data = {}
        self.loaded = True
        self._view.clear()

    def _fence(self) -> str | None:
        return self._lease.token if self._lease is not None and self._lease.name == self.id else None

    async def rotate(self) -> None:
        """Move to a fresh session id (a new cookie); the old id's data is deleted."""
        await self.store.delete(self.id)
        self.id = secrets.token_urlsafe(32)
        self.is_new = True
        self.used = True

    def claim(self) -> None:
        """Count a new session against its client's quota; raises :class:`TooManySessions`."""
        if self._claimed:
            return
        if self._admit_new is not None and not self._admit_new():
            raise TooManySessions("too many new sessions from this client; keep the session cookie and retry later")
        self._claimed = True

    @contextlib.asynccontextmanager
    async def lock(self, lease_s: float = DEFAULT_LEASE_S, wait_s: float = 0.0) -> AsyncIterator[None]:
        """Hold this session's lock for the block; :class:`SessionBusy` if another request holds it
        (for longer than ``wait_s``).

        The lock is a lease renewed every ``lease_s / 3`` while held, so a process that dies
        holding it frees the session within ``lease_s``. A new session counts against its
        client's quota here (:class:`TooManySessions`).
        """
        self.claim()
        deadline = time.monotonic() + wait_s
        while not await self._acquire(lease_s):
            if time.monotonic() >= deadline:
                raise SessionBusy("this session is being changed by another request; retry shortly")
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            await self._release()

    async def try_lock(self) -> bool:
        """The lock as the first version exposed it: take it, False if it is held."""
        self.claim()
        return await self._acquire(DEFAULT_LEASE_S)

    async def unlock(self) -> None:
        await self._release()

    async def _acquire(self, lease_s: float) -> bool:
        if self._lease is not None:
            return False  # already held by this very request: not re-entrant
        lease = Lease(self.store, self.id, lease_s, on_lost=self._lease_lost)
        if not await lease.acquire():
            return False
        self.used = True  # the response (which may start streaming before the save) carries the cookie
        self._lease = lease
        return True

    async def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()

    def _lease_lost(self, reason: str) -> None:
        if self.on_lease_lost is not None:
            self.on_lease_lost(reason)

    # -- parts: a conversation (or anything else) stored under its own key and lock --
    @contextlib.asynccontextmanager
    async def hold(self, part: str, lease_s: float, busy: str,
                   on_lost: Callable[[str], None] | None = None,
                   max_in_session: int | None = None) -> AsyncIterator[Lease]:
        """Hold the lock of one part of this session (``<session id>/<part>``, a conversation);
        :class:`SessionBusy` naming it, with the message ``busy``, while another request holds it.
        Parts lock independently of each other and of :meth:`lock`, so a user's conversations can
        stream in parallel (``max_in_session`` of them at most, across processes, when given)."""
        self.claim()
        lease = Lease(self.store, self._part_key(part), lease_s, on_lost, max_in_session)
        if not await lease.acquire():
            raise SessionBusy(busy, conversation_id=part)
        self.used = True
        try:
            yield lease
        finally:
            await lease.release()

    async def part_held(self, part: str) -> bool:
        """Whether any request (in any process) holds the lock of ``part`` now: a read, it takes nothing."""
        return not self.unseen and await self.store.lock_held(self._part_key(part))

    async def get_part(self, part: str) -> SessionData | None:
        """The conversation stored as ``part`` (``{**head, "messages": [...]}``), or None."""
        return None if self.unseen else await self.store.get_messages(self._part_key(part))

    async def put_part(self, part: str, data: SessionData, lease: Lease | None, *, migrating: bool = False) -> None:
        """Store the conversation ``data`` as ``part``, all of its messages, fenced by ``lease``
        (:class:`LeaseLost` if it ran out)."""
        head = {k: v for k, v in data.items() if k != "messages"}
        await self.put_messages(part, head, 0, list(data.get("messages") or []), lease, migrating=migrating)

    async def put_messages(self, part: str, head: SessionData, start: int, messages: list[SessionData],
                           lease: Lease | None, *, migrating: bool = False) -> None:
        """Messages of the conversation ``part`` from position ``start`` on become ``messages``
        (the rest are removed), its head ``head``; fenced by ``lease``."""
        self.used = True
        await self.store.set_messages(self._part_key(part), head, start, messages, self.ttl_s,
                                      fence=lease.token if lease else None, migrating=migrating)

    async def delete_part(self, part: str, lease: Lease | None) -> None:
        await self.store.delete(self._part_key(part), fence=lease.token if lease else None)

    def _part_key(self, part: str) -> str:
        return f"{self.id}/{part}"


def resolve_secret(secret: str | None) -> str:
    """The cookie-signing secret: the argument, else the environment, else random per process."""
    secret = secret or os.environ.get(SECRET_ENV)
    if secret:
        return secret
    logger.warning(
        "No session secret given (session_secret= or %s): using a random one, so sessions "
        "end when this process restarts and are not shared between processes.", SECRET_ENV,
    )
    return secrets.token_urlsafe(32)


class SessionMiddleware:
    """Pure ASGI middleware: puts a :class:`Session` at ``request.state.session``."""

    def __init__(
        self,
        app: ASGIApp,
        store: SessionStore | None = None,
        secret: str | None = None,
        cookie_name: str = "chatstream_session",
        max_age_s: int = 14 * 24 * 3600,
        https_only: bool = False,
        new_sessions_per_minute: int = 60,
    ) -> None:
        self.app = app
        self.store = store or MemorySessionStore()
        self.signer = TimestampSigner(resolve_secret(secret), salt="chatstream.session")
        self.cookie_name = cookie_name
        self.max_age_s = max_age_s
        self.https_only = https_only
        self.quota = NewSessionQuota(new_sessions_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session_id = self._session_id_from(scope)
        client = (scope.get("client") or ("?", 0))[0]
        session = Session(
            self.store, session_id or secrets.token_urlsafe(32), is_new=session_id is None, ttl_s=self.max_age_s,
            admit_new=lambda: self.quota.admit(client),
        )
        scope.setdefault("state", {})["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and session.is_new and session.used:
                headers = MutableHeaders(scope=message)
                headers.append("Set-Cookie", self._cookie(session.id))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _session_id_from(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", []):
            if name != b"cookie":
                continue
            cookie: SimpleCookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except Exception:
                continue
            morsel = cookie.get(self.cookie_name)
            if morsel is None:
                continue
            try:
                session_id = self.signer.unsign(morsel.value, max_age=self.max_age_s).decode()
            except (BadSignature, UnicodeDecodeError, ValueError):
                return None
            return session_id if _SESSION_ID.match(session_id) else None
        return None

    def _cookie(self, session_id: str) -> str:
        value = self.signer.sign(session_id).decode()
        parts = [f"{self.cookie_name}={value}", "Path=/", f"Max-Age={self.max_age_s}", "HttpOnly", "SameSite=Lax"]
        if self.https_only:
            parts.append("Secure")
        return "; ".join(parts)


class NewSessionQuota:
    """At most ``per_minute`` new sessions per client address (a token bucket per address).

    Behind a reverse proxy every client shares the proxy's address: raise the quota there (or set
    0 to turn it off) and rate-limit at the proxy instead.
    """

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def admit(self, client: str) -> bool:
        if self.per_minute <= 0:
            return True
        now = time.monotonic()
        tokens, at = self._buckets.pop(client, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * self.per_minute / 60.0)
        admitted = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if admitted else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return admitted
