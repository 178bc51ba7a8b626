"""Sessions in this process's memory: for tests, embedding, and single-process servers that may
forget everything on restart."""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from .store import SessionData, dump_json, dump_rows, group, lease_lost, store_full, too_large, too_many_held, utf8_len

# A value: (expires at, the JSON text of a document stored whole | [head, message, ...] in rows, bytes)
_Value = tuple[float, str | list[str], int]


class MemorySessionStore:
    """TTL per key, bounded in count and (``max_bytes``) in bytes; when full, the least recently
    used *idle* session goes.

    A locked session is in use (a reply is being generated into it), so it is evicted only when
    every other session is locked too: a flood of new sessions cannot drop a conversation that
    is being written. The number of locks is capped as well (``acquire_lock`` refuses beyond it).
    Values are kept as JSON text, so callers get the same fresh copies a networked store gives;
    a conversation as one text per message, so a checkpoint replaces one message.
    """

    def __init__(self, max_sessions: int = 10_000, max_locks: int = 10_000, *,
                 max_session_bytes: int | None = None, max_bytes: int | None = None) -> None:
        if max_sessions < 1 or max_locks < 1:
            raise ValueError("max_sessions and max_locks must be at least 1")
        self.max_sessions = max_sessions
        self.max_locks = max_locks
        self.max_session_bytes = max_session_bytes
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, _Value] = OrderedDict()  # least recently used first
        # lock name -> (token, lease end, counted: taken by a streaming reply, see acquire_lock's max_in_session)
        self._locks: dict[str, tuple[str, float, bool]] = {}
        self._group_bytes: dict[str, int] = {}  # session -> bytes it holds (all its keys)
        self.bytes = 0  # held by all sessions
        self._swept_at = 0.0

    async def get(self, session_id: str) -> SessionData | None:
        payload = self._live(session_id)
        if not isinstance(payload, str):  # nothing, or a conversation in rows (get_messages reads those)
            return None
        return json.loads(payload)

    async def set(self, session_id: str, data: SessionData, ttl_s: float, fence: str | None = None) -> None:
        text = dump_json(data, self.max_session_bytes)
        self._check_fence(session_id, fence)
        self._write(session_id, text, utf8_len(text), ttl_s)

    async def delete(self, session_id: str, fence: str | None = None) -> None:
        self._check_fence(session_id, fence)
        self._pop(session_id)

    async def get_messages(self, key: str) -> SessionData | None:
        payload = self._live(key)
        if payload is None:
            return None
        return _assemble(payload) if isinstance(payload, list) else json.loads(payload)

    async def set_messages(self, key: str, head: SessionData, start: int, messages: list[SessionData],
                           ttl_s: float, fence: str | None = None, *, migrating: bool = False) -> None:
        head_text, rows = dump_rows(head, messages)
        self._check_fence(key, fence)
        payload = self._live(key)
        if isinstance(payload, str):  # stored whole (an older layout): converted to rows
            stored = json.loads(payload)
            payload = ["{}", *dump_rows({}, [m for m in stored.get("messages") or [] if isinstance(m, dict)])[1]]
        old = payload or ["{}"]
        if not 0 <= start <= len(old) - 1:
            raise ValueError(f"messages from position {start}: the conversation holds {len(old) - 1}")
        new = [head_text, *old[1:start + 1], *rows]
        self._write(key, new, sum(utf8_len(t) for t in new), ttl_s, check_quota=not migrating)

    async def acquire_lock(self, session_id: str, lease_s: float, *, max_in_session: int | None = None) -> str | None:
        now = time.monotonic()
        if self._holds(session_id, now):
            return None
        if max_in_session is not None:
            prefix = group(session_id) + "/"
            if sum(1 for name, (_, _, counted) in self._locks.items()
                   if counted and name.startswith(prefix) and self._holds(name, now)) >= max_in_session:
                raise too_many_held(session_id, max_in_session)
        if session_id not in self._locks and len(self._locks) >= self.max_locks:
            self._drop_expired_locks(now)
            if len(self._locks) >= self.max_locks:
                return None  # never break another holder's lock to make room
        token = secrets.token_urlsafe(16)
        self._locks[session_id] = (token, now + lease_s, max_in_session is not None)
        return token

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        now = time.monotonic()
        held = self._locks.get(session_id)
        if held is None or held[0] != token or held[1] <= now:
            return False
        self._locks[session_id] = (token, now + lease_s, held[2])
        return True

    async def release_lock(self, session_id: str, token: str) -> None:
        held = self._locks.get(session_id)
        if held is not None and held[0] == token:
            del self._locks[session_id]

    async def lock_held(self, session_id: str) -> bool:
        return self._holds(session_id, time.monotonic())

    async def close(self) -> None:
        pass

    # -- values and their bytes --
    def _live(self, key: str) -> str | list[str] | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            self._pop(key)
            return None
        self._data.move_to_end(key)
        return item[1]

    def _write(self, key: str, payload: str | list[str], size: int, ttl_s: float, check_quota: bool = True) -> None:
        """Store ``payload`` unless it grows its session past its quota or the store past ``max_bytes``
        (after evicting idle sessions): then nothing changes."""
        old = self._data[key][2] if key in self._data else 0
        session = group(key)
        if check_quota and self.max_session_bytes is not None and size > old:
            total = self._group_bytes.get(session, 0) - old + size
            if total > self.max_session_bytes:
                raise too_large(key, total, self.max_session_bytes)
        if self.max_bytes is not None and size > old and self.bytes - old + size > self.max_bytes:
            limit = self.max_bytes
            # Idle sessions only: a session being written into is never dropped for bytes (refused instead).
            self._evict(keep=key, until=lambda: self.bytes - old + size <= limit, idle_only=True)
            if self.bytes - old + size > limit:
                raise store_full(limit)
        self._pop(key)
        self._data[key] = (time.monotonic() + ttl_s, payload, size)
        self._group_bytes[session] = self._group_bytes.get(session, 0) + size
        self.bytes += size
        if len(self._data) > self.max_sessions:
            self._evict(keep=key, until=lambda: len(self._data) <= self.max_sessions)

    def _pop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is None:
            return
        session = group(key)
        self.bytes -= item[2]
        left = self._group_bytes.get(session, 0) - item[2]
        if left > 0:
            self._group_bytes[session] = left
        else:
            self._group_bytes.pop(session, None)

    # -- locks --
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
        for session_id in [s for s, (_, end, _) in self._locks.items() if end <= now]:
            del self._locks[session_id]

    def _evict(self, keep: str, until: Callable[[], bool], idle_only: bool = False) -> None:
        """Drop expired sessions, then idle ones least recently used first; locked ones last."""
        now = time.monotonic()
        if now - self._swept_at >= 1.0:  # a full scan at most once a second, not on every set
            self._swept_at = now
            for key in [k for k, (expires, _, _) in self._data.items() if expires <= now]:
                self._pop(key)
        # A session's conversations are stored under "<session id>/<conversation id>": a session goes
        # whole (its index and every conversation), and one with any lock held counts as in use.
        keep_group = group(keep)
        while not until():
            in_use = {group(s) for s in self._locks if self._holds(s, now)}
            victim = next((s for s in self._data if group(s) not in in_use and group(s) != keep_group), None)
            if victim is None and not idle_only:  # everything else is locked: the least recently used goes
                victim = next((s for s in self._data if group(s) != keep_group), None)
            if victim is None:
                return
            session = group(victim)
            for key in [k for k in self._data if group(k) == session]:
                self._pop(key)


def _assemble(payload: list[str]) -> SessionData:
    data: SessionData = json.loads(payload[0])
    data["messages"] = [json.loads(text) for text in payload[1:]]
    return data
