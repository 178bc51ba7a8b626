"""The interface every session store implements.

Values are plain JSON (never pickle: a compromised store must not become code execution), so
the memory, SQLite and Redis stores are interchangeable and pass one shared test suite.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from ..errors import LeaseLost, SessionTooLarge

SessionData = dict[str, Any]


@runtime_checkable
class SessionStore(Protocol):
    """Session data with a TTL per key, and a per-session lock held under a lease.

    The lock is a lease, not a flag: a holder that crashes (or a process that dies) frees the
    session when its lease runs out, so holders refresh the lease while they work.
    """

    async def get(self, session_id: str) -> SessionData | None:
        """The session's data, or None if it does not exist or has expired."""
        ...

    async def set(self, session_id: str, data: SessionData, ttl_s: float, fence: str | None = None) -> None:
        """Store ``data`` (JSON-serializable) for ``ttl_s`` seconds from now.

        With ``fence`` (a lock token), the write happens only if that token still holds the
        session's lock with an unexpired lease, checked in the same atomic step as the write;
        otherwise :class:`~chatstream.errors.LeaseLost` is raised and nothing changes.
        """
        ...

    async def delete(self, session_id: str, fence: str | None = None) -> None:
        """Delete the session's data (fenced like :meth:`set` when ``fence`` is given)."""
        ...

    async def acquire_lock(self, session_id: str, lease_s: float) -> str | None:
        """A new owner token, or None while someone else holds an unexpired lease."""
        ...

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        """Extend the lease to ``lease_s`` from now, only if ``token`` still owns the lock."""
        ...

    async def release_lock(self, session_id: str, token: str) -> None:
        """Release the lock only if ``token`` owns it: nobody frees another's lock."""
        ...

    async def close(self) -> None: ...


def dump_json(data: SessionData, max_bytes: int | None = None) -> str:
    """Compact JSON text; raises TypeError/ValueError for anything that is not plain JSON, and
    :class:`SessionTooLarge` when it is over ``max_bytes`` (UTF-8)."""
    if not isinstance(data, dict):
        raise TypeError(f"session data must be a dict, not {type(data).__name__}")
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if max_bytes is not None and len(text) * 4 > max_bytes and len(size := text.encode()) > max_bytes:
        raise SessionTooLarge(
            f"this would store {len(size)} bytes under one key (a conversation); the limit is {max_bytes} bytes "
            "(--session-max-bytes): clear the conversation or start another to go on"
        )
    return text


def lease_lost(session_id: str) -> LeaseLost:
    return LeaseLost(
        f"session {session_id[:8]}…: this request's lock lease ran out (it stalled) and the write was refused, "
        "so nothing changed by others meanwhile is overwritten"
    )
