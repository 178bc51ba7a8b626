"""The interface every session store implements.

Values are plain JSON (never pickle: a compromised store must not become code execution), so
the memory, SQLite and Redis stores are interchangeable and pass one shared test suite.

Two kinds of values: a document stored whole (:meth:`SessionStore.set`: a session's index of
conversations, a stored response) and a conversation stored as rows (:meth:`SessionStore.set_messages`:
a head, ``{"system", "context_start"?}``, and one row per message), so a turn appends its messages
and a checkpoint of a streaming reply rewrites that one message, never the whole conversation.

Keys ``<session id>/<part>`` belong to the session ``<session id>``: its byte quota
(``max_session_bytes``) counts every value stored under it and under its parts.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from ..errors import LeaseLost, SessionBusy, SessionTooLarge, StoreFull

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
        """Delete the value under the key, whole or in rows (fenced like :meth:`set` when ``fence`` is given)."""
        ...

    async def get_messages(self, key: str) -> SessionData | None:
        """The conversation stored in rows under ``key`` as ``{**head, "messages": [...]}``; a
        conversation an older version stored whole under ``key`` is returned as it is; None if neither."""
        ...

    async def set_messages(self, key: str, head: SessionData, start: int, messages: list[SessionData],
                           ttl_s: float, fence: str | None = None, *, migrating: bool = False) -> None:
        """The conversation's messages from position ``start`` on become ``messages`` (rows after
        them are removed) and its head becomes ``head``, in one atomic step, fenced like :meth:`set`.

        A checkpoint passes only the reply it updates; a turn its new messages. A conversation
        stored whole (an older layout) is converted to rows in the same step. ``start`` beyond the
        stored messages raises ValueError. ``migrating``: data the session already held elsewhere
        (a split of an older layout), not counted against its quota.
        """
        ...

    async def acquire_lock(self, session_id: str, lease_s: float, *, max_in_session: int | None = None) -> str | None:
        """A new owner token, or None while someone else holds an unexpired lease.

        With ``max_in_session``, the lock of a part (``<session>/<part>``) is refused with
        :class:`~chatstream.errors.SessionBusy` while the session already holds that many
        unexpired locks of its parts (in any process): a per-user limit of parallel replies.
        """
        ...

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        """Extend the lease to ``lease_s`` from now, only if ``token`` still owns the lock."""
        ...

    async def release_lock(self, session_id: str, token: str) -> None:
        """Release the lock only if ``token`` owns it: nobody frees another's lock."""
        ...

    async def lock_held(self, session_id: str) -> bool:
        """Whether anyone holds the lock with an unexpired lease (a read: it takes nothing). A reply
        marked as streaming whose conversation's lock nobody holds lost its writer: it is stopped."""
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
            f"this would store {len(size)} bytes under one key; the limit is {max_bytes} bytes per session "
            "(--session-max-bytes): delete or clear a conversation to go on"
        )
    return text


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is plain ASCII."""
    return len(text) if text.isascii() else len(text.encode())


def dump_rows(head: SessionData, messages: list[SessionData]) -> tuple[str, list[str]]:
    """The head and each message as compact JSON text (TypeError/ValueError for anything not plain JSON)."""
    if not isinstance(head, dict) or "messages" in head:
        raise TypeError("a conversation's head must be a dict without 'messages'")
    if not all(isinstance(m, dict) for m in messages):
        raise TypeError("each message must be a dict")
    return dump_json(head), [dump_json(m) for m in messages]


def group(key: str) -> str:
    """The session a key belongs to: ``<session id>`` of ``<session id>/<part>``."""
    return key.split("/", 1)[0]


def too_large(key: str, total: int, limit: int) -> SessionTooLarge:
    return SessionTooLarge(
        f"session {group(key)[:8]}… would hold {total} bytes; the limit is {limit} bytes per session "
        "(--session-max-bytes): delete or clear a conversation to go on"
    )


def store_full(limit: int | None = None) -> StoreFull:
    where = f"its limit of {limit} bytes, --session-store-max-bytes" if limit else "its size limit or the disk"
    return StoreFull(f"the session store is full ({where}): delete conversations to free space")


def too_many_held(key: str, limit: int) -> SessionBusy:
    return SessionBusy(f"{limit} replies are already being generated in this session (the most one user may run "
                       "at once, across every server process); wait for one to finish")


def lease_lost(session_id: str) -> LeaseLost:
    return LeaseLost(
        f"session {session_id[:8]}…: this request's lock lease ran out (it stalled) and the write was refused, "
        "so nothing changed by others meanwhile is overwritten"
    )
