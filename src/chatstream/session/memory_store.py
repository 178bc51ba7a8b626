"""Sessions in this process's memory: for tests, embedding, and single-process servers that may
forget everything on restart."""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict

from .store import SessionData, dump_json, lease_lost


class MemorySessionStore:
    """TTL per key, bounded in count; when full, the least recently used *idle* session goes.

    A locked session is in use (a reply is being generated into it), so it is evicted only when
    every other session is locked too: a flood of new sessions cannot drop a conversation that
    is being written. The number of locks is capped as well (``acquire_lock`` refuses beyond it).
    Values are kept as JSON text, so callers get the same fresh copies a networked store gives.
    """

    def __init__(self, max_sessions: int = 10_000, max_locks: int = 10_000, *,
                 max_session_bytes: int | None = None) -> None:
        if max_sessions < 1 or max_locks < 1:
            raise ValueError("max_sessions and max_locks must be at least 1")
        self.max_sessions = max_sessions
        self.max_locks = max_locks
        self.max_session_bytes = max_session_bytes
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()  # least recently used first
        self._locks: dict[str, tuple[str, float]] = {}  # session id -> (token, lease end)
        self._swept_at = 0.0

    async def get(self, session_id: str) -> SessionData | None:
        item = self._data.get(session_id)
        if item is None:
            return None
        expires, text = item
        if expires <= time.monotonic():
            del self._data[session_id]
            return None
        self._data.move_to_end(session_id)
        return json.loads(text)

    async def set(self, session_id: str, data: SessionData, ttl_s: float, fence: str | None = None) -> None:
        text = dump_json(data, self.max_session_bytes)
        self._check_fence(session_id, fence)
        self._data[session_id] = (time.monotonic() + ttl_s, text)
        self._data.move_to_end(session_id)
        if len(self._data) > self.max_sessions:
            self._evict(keep=session_id)

    async def delete(self, session_id: str, fence: str | None = None) -> None:
        self._check_fence(session_id, fence)
        self._data.pop(session_id, None)

    async def acquire_lock(self, session_id: str, lease_s: float) -> str | None:
        now = time.monotonic()
        if self._holds(session_id, now):
            return None
        if session_id not in self._locks and len(self._locks) >= self.max_locks:
            self._drop_expired_locks(now)
            if len(self._locks) >= self.max_locks:
                return None  # never break another holder's lock to make room
        token = secrets.token_urlsafe(16)
        self._locks[session_id] = (token, now + lease_s)
        return token

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        now = time.monotonic()
        held = self._locks.get(session_id)
        if held is None or held[0] != token or held[1] <= now:
            return False
        self._locks[session_id] = (token, now + lease_s)
        return True

    async def release_lock(self, session_id: str, token: str) -> None:
        held = self._locks.get(session_id)
        if held is not None and held[0] == token:
            del self._locks[session_id]

    async def close(self) -> None:
        pass

    def _check_fence(self, session_id: str, fence: str | None) -> None:
        if fence is None:
            return
        held = self._locks.get(session_id)
        if held is None or held[0] != fence or held[1] <= time.monotonic():
            raise lease_lost(session_id)

    def _holds(self, session_id: str, now: float) -> bool:
        held = self._locks.get(session_id)
        return held is not None and held[1] > now

    def _drop_expired_locks(self, now: float) -> None:
        for session_id in [s for s, (_, end) in self._locks.items() if end <= now]:
            del self._locks[session_id]

    def _evict(self, keep: str) -> None:
        """Drop expired sessions, then idle ones least recently used first; locked ones last."""
        now = time.monotonic()
        if now - self._swept_at >= 1.0:  # a full scan at most once a second, not on every set
            self._swept_at = now
            for session_id in [s for s, (expires, _) in self._data.items() if expires <= now]:
                del self._data[session_id]
        # A session's conversations are stored under "<session id>/<conversation id>": a session goes
        # whole (its index and every conversation), and one with any lock held counts as in use.
        keep_group = _group(keep)
        while len(self._data) > self.max_sessions:
            in_use = {_group(s) for s in self._locks if self._holds(s, now)}
            victim = next((s for s in self._data if _group(s) not in in_use and _group(s) != keep_group), None)
            if victim is None:  # everything else is locked: the least recently used goes
                victim = next((s for s in self._data if _group(s) != keep_group), None)
            if victim is None:
                return
            group = _group(victim)
            for key in [k for k in self._data if _group(k) == group]:
                del self._data[key]


def _group(key: str) -> str:
    return key.split("/", 1)[0]
