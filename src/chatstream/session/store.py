"""Where session data lives. Plain JSON-serializable dicts only: never pickle.

A store is a small interface (get, set with TTL, delete, and a per-session lock) so that the
in-memory store and a Redis store are interchangeable.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

SessionData = dict[str, Any]


@runtime_checkable
class SessionStore(Protocol):
    async def get(self, session_id: str) -> SessionData | None: ...

    async def set(self, session_id: str, data: SessionData, ttl_s: int) -> None: ...

    async def delete(self, session_id: str) -> None: ...

    async def try_lock(self, session_id: str, ttl_s: int) -> bool:
        """Take the session's generation lock; False if another request holds it."""
        ...

    async def unlock(self, session_id: str) -> None: ...


class MemorySessionStore:
    """Sessions in this process's memory, expired by TTL and bounded in count (oldest evicted)."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self._data: OrderedDict[str, tuple[float, SessionData]] = OrderedDict()
        self._locks: dict[str, float] = {}

    async def get(self, session_id: str) -> SessionData | None:
        item = self._data.get(session_id)
        if item is None:
            return None
        expires, data = item
        if expires < time.monotonic():
            del self._data[session_id]
            return None
        self._data.move_to_end(session_id)
        # A copy, as a networked store would give: callers can't mutate stored state by accident.
        return copy.deepcopy(data)

    async def set(self, session_id: str, data: SessionData, ttl_s: int) -> None:
        self._data[session_id] = (time.monotonic() + ttl_s, copy.deepcopy(data))
        self._data.move_to_end(session_id)
        while len(self._data) > self.max_sessions:
            self._data.popitem(last=False)

    async def delete(self, session_id: str) -> None:
        self._data.pop(session_id, None)

    async def try_lock(self, session_id: str, ttl_s: int) -> bool:
        now = time.monotonic()
        held_until = self._locks.get(session_id)
        if held_until is not None and held_until > now:
            return False
        self._locks[session_id] = now + ttl_s
        return True

    async def unlock(self, session_id: str) -> None:
        self._locks.pop(session_id, None)
