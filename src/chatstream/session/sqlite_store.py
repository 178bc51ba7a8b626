"""Sessions in one SQLite file: the default of ``chatstream serve``, so a restart loses nothing.

The standard library's ``sqlite3`` runs off the event loop (no extra dependency; aiosqlite does
the same thing with more machinery), so the loop never waits on the disk or on another process's
write lock. Writes run on one dedicated thread with the one writing connection, so they are
serialized and each needs no locking of its own. Reads run on a few threads of their own, each
with its own read-only connection: WAL mode lets readers proceed while anyone writes and while
other readers read, so one user's long read (a 25 MB conversation) never queues another user's
request (or ``/health``) behind it. ``busy_timeout`` makes a writer wait for another process
instead of failing, so several processes may open the same file.

A full disk: even a delete needs room in SQLite's write-ahead log, so the store keeps a small
reserve file next to the database (``sessions.db-reserve``) and gives its room back for one retry
of a write the disk refused, on the condition that the write does not grow the database (a delete,
a smaller rewrite, a lock, a turn stored in pages a delete freed). The log is then checkpointed
and truncated and the reserve made again, so deleting conversations always works and frees room.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..errors import StoreFull, StoreUnavailable
from .store import SessionData, dump_json, dump_rows, group, lease_lost, store_full, too_large, too_many_held, utf8_len

T = TypeVar("T")
logger = logging.getLogger("chatstream.session")

RESERVE_BYTES = 512 * 1024  # room for the log frames of a delete (a few pages) or a mid-size turn
READERS = 4  # reads in parallel per store: a few long reads at once still leave room for the others

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, data TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expires_at ON sessions (expires_at);
-- ``counted``: taken by a streaming reply, the locks the per-session limit of parallel replies counts.
CREATE TABLE IF NOT EXISTS session_locks (
    id TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL, counted INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- Conversations in rows: a head (system prompt, context start) and one row per message, so a
-- checkpoint rewrites one message. ``bytes`` (head + messages) is what the session's quota counts.
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, session TEXT NOT NULL, head TEXT NOT NULL, count INTEGER NOT NULL,
    bytes INTEGER NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversations_session ON conversations (session);
CREATE INDEX IF NOT EXISTS conversations_expires_at ON conversations (expires_at);
CREATE TABLE IF NOT EXISTS messages (
    conversation TEXT NOT NULL, position INTEGER NOT NULL, data TEXT NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (conversation, position));
"""

# One statement, so atomic: take the lock if it is free or its lease has run out.
_ACQUIRE = """
INSERT INTO session_locks (id, token, expires_at, counted) VALUES (:id, :token, :until, :counted)
ON CONFLICT (id) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at, counted = excluded.counted
WHERE session_locks.expires_at <= :now
"""


class SQLiteSessionStore:
    """Sessions and their locks in one SQLite file, shared safely by several processes.

    Times are wall-clock (``time.time()``) because other processes read them. Expired rows read
    as absent, and a sweep that runs at most every ``sweep_interval_s`` on writes removes them.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 5.0, sweep_interval_s: float = 60.0, *,
                 max_bytes: int | None = None, max_session_bytes: int | None = None,
                 reserve_bytes: int = RESERVE_BYTES, readers: int = READERS) -> None:
        self.path = Path(path)
        self.reserve_path = self.path.with_name(self.path.name + "-reserve")
        self.reserve_bytes = reserve_bytes
        self.max_bytes = max_bytes
        self.max_session_bytes = max_session_bytes
        self.sweep_interval_s = sweep_interval_s
        self._swept_at = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Conversations are private: a new file is 0600 (SQLite gives its -wal/-shm files the same).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        # Opened here, synchronously, so a bad path fails at startup rather than on a request.
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # e.g. a network file system: still correct, but readers wait for writers
                logger.warning("SQLite session store %s: WAL mode unavailable (journal_mode=%s)", self.path, mode)
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._page_size: int = self._db.execute("PRAGMA page_size").fetchone()[0]
            if reserve_bytes > 0:
                # Copy the log into the database every half reserve of pages (SQLite's default is 1000
                # pages, 4 MiB): a checkpoint on a full disk grows the database by what the log holds
                # that it lacks, and must fit in the reserve's room, or it fails halfway, the grown
                # database keeps the reserve's room, and neither the log nor the reserve ever shrinks.
                self._db.execute(f"PRAGMA wal_autocheckpoint = {max(1, reserve_bytes // self._page_size // 2)}")
                self._db.execute(f"PRAGMA journal_size_limit = {reserve_bytes}")  # a big turn's log shrinks
            self._db.executescript(_SCHEMA)
            if "counted" not in {row[1] for row in self._db.execute("PRAGMA table_info(session_locks)")}:
                # A file from before the column: its locks are not counted (they expire within a lease).
                try:
                    self._db.execute("ALTER TABLE session_locks ADD COLUMN counted INTEGER NOT NULL DEFAULT 0")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
            if max_bytes is not None:  # the store's quota: writes past it fail with SQLITE_FULL (StoreFull)
                self._db.execute(f"PRAGMA max_page_count = {max(16, int(max_bytes) // self._page_size)}")
        except sqlite3.Error:
            self._db.close()
            raise
        self._make_reserve()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatstream-sqlite")
        # Read connections, opened now (a bad file fails at startup) and handed out one per running
        # read: as many threads as connections, so a read never waits for a free one.
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._read_connections: list[sqlite3.Connection] = []
        try:
            for _ in range(max(1, readers)):
                reader = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
                self._read_connections.append(reader)
                reader.execute("PRAGMA query_only = ON")  # a read never takes the write lock nor needs the reserve
                self._readers.put(reader)
        except sqlite3.Error:
            for reader in self._read_connections:
                reader.close()
            self._db.close()
            raise
        self._read_threads = ThreadPoolExecutor(max_workers=len(self._read_connections),
                                                thread_name_prefix="chatstream-sqlite-read")
        self._closed = False
        self.failure: str | None = None  # why the last operation failed, until one succeeds (for /health)

    async def get(self, session_id: str) -> SessionData | None:
        def get(db: sqlite3.Connection) -> SessionData | None:
            row = db.execute("SELECT data FROM sessions WHERE id = ? AND expires_at > ?",
                             (session_id, time.time())).fetchone()
            return json.loads(row[0]) if row is not None else None  # parsed here, not on the event loop

        return await self._read(get)

    async def set(self, session_id: str, data: SessionData, ttl_s: float, fence: str | None = None) -> None:
        def set_() -> None:
            text = dump_json(data, self.max_session_bytes)
            now = time.time()

            def write() -> None:
                self._check_fence(session_id, fence, now)
                before = self._session_bytes(session_id, now)
                # Delete, then insert, in one transaction: the old row's pages are free for the new
                # one, so a smaller session (a conversation deleted) always fits in a full store.
                self._drop(session_id)
                self._db.execute("INSERT INTO sessions (id, data, expires_at) VALUES (?, ?, ?)",
                                 (session_id, text, now + ttl_s))
                self._check_quota(session_id, before, now)

            if now - self._swept_at >= self.sweep_interval_s:
                self._sweep(now)  # first: what expired frees its space for this write
            self._transaction(write)

        await self._run(set_)

    async def delete(self, session_id: str, fence: str | None = None) -> None:
        def delete() -> None:
            now = time.time()

            def write() -> None:
                self._check_fence(session_id, fence, now)
                self._drop(session_id)

            self._transaction(write)

        await self._run(delete)

    async def get_messages(self, key: str) -> SessionData | None:
        def get(db: sqlite3.Connection) -> SessionData | None:
            now = time.time()
            row = db.execute("SELECT head, expires_at FROM conversations WHERE id = ?", (key,)).fetchone()
            if row is None:  # not in rows: stored whole by an older version, or nothing
                found = db.execute("SELECT data, expires_at FROM sessions WHERE id = ?", (key,)).fetchone()
                return json.loads(found[0]) if found is not None and found[1] > now else None
            if row[1] <= now:
                return None  # expired: the sweep deletes its rows
            db.execute("BEGIN")  # one snapshot for the head and the rows (WAL: writers go on meanwhile)
            try:
                row = db.execute("SELECT head FROM conversations WHERE id = ?", (key,)).fetchone()
                texts = db.execute("SELECT data FROM messages WHERE conversation = ? ORDER BY position",
                                   (key,)).fetchall()
            finally:
                db.execute("COMMIT")
            if row is None:
                return None
            data: SessionData = json.loads(row[0])
            data["messages"] = [json.loads(text) for (text,) in texts]
            return data

        return await self._read(get)

    async def set_messages(self, key: str, head: SessionData, start: int, messages: list[SessionData],
                           ttl_s: float, fence: str | None = None, *, migrating: bool = False) -> None:
        def set_messages() -> None:
            head_text, rows = dump_rows(head, messages)
            sizes = [utf8_len(text) for text in rows]
            now = time.time()

            def write() -> None:
                self._check_fence(key, fence, now)
                before = self._session_bytes(key, now)
                count, size = self._rows_of(key, now)
                if not 0 <= start <= count:
                    raise ValueError(f"messages from position {start}: the conversation holds {count}")
                removed = self._db.execute(
                    "SELECT coalesce(sum(bytes), 0) FROM messages WHERE conversation = ? AND position >= ?",
                    (key, start)).fetchone()[0]
                self._db.execute("DELETE FROM messages WHERE conversation = ? AND position >= ?", (key, start))
                self._db.executemany(
                    "INSERT INTO messages (conversation, position, data, bytes) VALUES (?, ?, ?, ?)",
                    [(key, start + n, text, sizes[n]) for n, text in enumerate(rows)])
                self._db.execute(
                    "INSERT OR REPLACE INTO conversations (id, session, head, count, bytes, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (key, group(key), head_text, start + len(rows), size - removed + sum(sizes) + utf8_len(head_text),
                     now + ttl_s))
                if not migrating:
                    self._check_quota(key, before, now)

            if now - self._swept_at >= self.sweep_interval_s:
                self._sweep(now)  # first: what expired frees its space for this write
            self._transaction(write)

        await self._run(set_messages)

    def _rows_of(self, key: str, now: float) -> tuple[int, int]:
        """(messages, bytes of the messages) stored in rows under ``key``, converting a conversation
        stored whole (an older layout) to rows first. Inside the write transaction."""
        row = self._db.execute("SELECT count, bytes, expires_at, head FROM conversations WHERE id = ?",
                               (key,)).fetchone()
        if row is not None and row[2] > now:
            return row[0], row[1] - utf8_len(row[3])
        self._drop(key, whole=False)  # expired rows, if any
        found = self._db.execute("SELECT data FROM sessions WHERE id = ? AND expires_at > ?", (key, now)).fetchone()
        if found is None:
            return 0, 0
        stored = json.loads(found[0])
        old = [m for m in stored.get("messages") or [] if isinstance(m, dict)] if isinstance(stored, dict) else []
        _, rows = dump_rows({}, old)
        sizes = [utf8_len(text) for text in rows]
        self._db.executemany("INSERT INTO messages (conversation, position, data, bytes) VALUES (?, ?, ?, ?)",
                             [(key, n, text, sizes[n]) for n, text in enumerate(rows)])
        self._db.execute("DELETE FROM sessions WHERE id = ?", (key,))
        return len(rows), sum(sizes)

    def _drop(self, key: str, whole: bool = True) -> None:
        """Delete what is stored under ``key``: in rows, and (``whole``) as one document."""
        if whole:
            self._db.execute("DELETE FROM sessions WHERE id = ?", (key,))
        self._db.execute("DELETE FROM messages WHERE conversation = ?", (key,))
        self._db.execute("DELETE FROM conversations WHERE id = ?", (key,))

    def _session_bytes(self, key: str, now: float) -> int:
        """Bytes the session of ``key`` holds: its documents (its index, older-layout conversations) and its rows."""
        if self.max_session_bytes is None:
            return 0
        session = group(key)
        whole = self._db.execute(
            "SELECT coalesce(sum(length(CAST(data AS BLOB))), 0) FROM sessions "
            "WHERE (id = ? OR (id >= ? AND id < ?)) AND expires_at > ?",
            (session, session + "/", session + "0", now)).fetchone()[0]
        rows = self._db.execute(
            "SELECT coalesce(sum(bytes), 0) FROM conversations WHERE session = ? AND expires_at > ?",
            (session, now)).fetchone()[0]
        return int(whole) + int(rows)

    def _check_quota(self, key: str, before: int, now: float) -> None:
        """Refuse (roll back) a write that grows the session past its quota; a shrinking one always passes."""
        if self.max_session_bytes is None:
            return
        after = self._session_bytes(key, now)
        if after > self.max_session_bytes and after > before:
            raise too_large(key, after, self.max_session_bytes)

    async def acquire_lock(self, session_id: str, lease_s: float, *, max_in_session: int | None = None) -> str | None:
        token = secrets.token_urlsafe(16)

        def acquire() -> bool:
            now = time.time()
            params = {"id": session_id, "token": token, "until": now + lease_s, "now": now,
                      "counted": int(max_in_session is not None)}
            if max_in_session is None:
                return self._db.execute(_ACQUIRE, params).rowcount == 1
            # counted and taken in one transaction (acquire runs inside one): two processes cannot
            # both take the last place
            session = group(session_id)
            held = self._db.execute(
                "SELECT count(*) FROM session_locks WHERE id >= ? AND id < ? AND id != ? AND expires_at > ? "
                "AND counted",  # streaming replies only, as the README states (and the Redis store counts)
                (session + "/", session + "0", session_id, now)).fetchone()[0]
            taken = self._db.execute(_ACQUIRE, params).rowcount == 1
            if taken and held >= max_in_session:
                raise too_many_held(session_id, max_in_session)
            return taken

        return token if await self._run(lambda: self._transaction(acquire)) else None

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        def refresh() -> bool:
            now = time.time()
            cursor = self._db.execute(
                "UPDATE session_locks SET expires_at = ? WHERE id = ? AND token = ? AND expires_at > ?",
                (now + lease_s, session_id, token, now),
            )
            return cursor.rowcount == 1

        return await self._run(lambda: self._transaction(refresh))

    async def release_lock(self, session_id: str, token: str) -> None:
        def release() -> None:
            self._db.execute("DELETE FROM session_locks WHERE id = ? AND token = ?", (session_id, token))

        await self._run(lambda: self._transaction(release))

    async def lock_held(self, session_id: str) -> bool:
        def held(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM session_locks WHERE id = ? AND expires_at > ?",
                              (session_id, time.time())).fetchone() is not None

        return await self._read(held)

    async def sweep(self) -> None:
        """Remove expired sessions and locks now (this also happens by itself on writes)."""
        await self._run(lambda: self._sweep(time.time()))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._db.close, closing=True)
        self._thread.shutdown(wait=False)
        # No read still running on a connection closed below (waited for off the event loop).
        await asyncio.to_thread(self._read_threads.shutdown, True)
        for reader in self._read_connections:
            reader.close()

    def _transaction(self, write: Callable[[], T]) -> T:
        """``write`` in one transaction that holds SQLite's write lock from its first read (so a
        fence checked in it still holds when the write commits, whatever other processes do).

        When the disk refuses it: once more after a checkpoint gives the log's room back (SQLite
        checkpoints by itself only past 1000 pages; the checkpoint may need the reserve's room to
        copy the log into the database), then once with the reserve's room if the write does not
        grow the database; the reserve is made again afterwards.
        """
        try:
            result = self._commit(write, may_grow=True)
        except sqlite3.Error as exc:
            if not _disk_full(exc):
                raise
        else:
            if not self._reserve_kept:  # the disk had no room for it last time: try again now
                self._checkpoint()  # a log truncated gives its room back
                self._make_reserve()
            return result
        self._release_reserve()
        self._checkpoint()
        self._make_reserve()
        if self._reserve_kept:  # else the room the checkpoint freed is the reserve's, for the retry below
            try:
                return self._commit(write, may_grow=True)
            except sqlite3.Error as exc:
                if not _disk_full(exc):
                    raise
        self._release_reserve()
        try:
            return self._commit(write, may_grow=False)
        finally:
            self._checkpoint()
            self._make_reserve()

    def _commit(self, write: Callable[[], T], may_grow: bool) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            result = write()
            grown = self._db.execute("PRAGMA page_count").fetchone()[0]
            if grown > pages:
                if not may_grow:
                    raise store_full()  # it would take disk room the reserve keeps for deletes
                self._check_room(grown, grown - pages)
            self._db.execute("COMMIT")
            return result
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _check_room(self, pages: int, new_pages: int) -> None:
        """Refuse a write that grows the database by ``new_pages`` (to ``pages``) when the disk could
        not take the log into the database afterwards, even with the reserve's room: a big turn
        written to the log there would strand it (no checkpoint, no reserve, no room for a delete)."""
        if self.reserve_bytes <= 0:
            return
        try:
            behind = pages * self._page_size - os.stat(self.path).st_size  # what a checkpoint adds to the file
            disk = os.statvfs(self.path.parent)
            room = disk.f_bavail * disk.f_frsize + self._reserve_size() - new_pages * (self._page_size + 24)
        except OSError:
            return
        if behind > room:
            raise _NoRoom(f"database or disk is full: a checkpoint would need {behind} bytes, {room} are left")

    def _limit_reached(self, exc: sqlite3.Error) -> int | None:
        """``max_bytes`` when it, not the disk, refused a write: it left less room than the disk has."""
        if self.max_bytes is None or isinstance(exc, _NoRoom):
            return None
        try:
            disk = os.statvfs(self.path.parent)
            room = disk.f_bavail * disk.f_frsize
            return self.max_bytes if self.max_bytes - os.stat(self.path).st_size <= room else None
        except OSError:
            return None

    def _reserve_size(self) -> int:
        try:
            return os.stat(self.reserve_path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def _checkpoint(self) -> None:
        """Copy the log into the database and truncate it: its room goes back to the disk."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:  # no room to grow the database, or busy: the log stays as it is
            logger.debug("SQLite session store %s: checkpoint failed: %s", self.path, exc)

    def _make_reserve(self) -> None:
        self._reserve_kept = True
        if self.reserve_bytes <= 0:
            return
        try:
            fd = os.open(self.reserve_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)  # allocated blocks, not a sparse file
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk: whatever part was made stays, the rest after a later write
            self._reserve_kept = False
            logger.warning("SQLite session store %s: cannot keep %d bytes of reserve: %s",
                           self.path, self.reserve_bytes, exc)

    def _release_reserve(self) -> None:
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            pass

    def _check_fence(self, session_id: str, fence: str | None, now: float) -> None:
        if fence is None:
            return
        held = self._db.execute(
            "SELECT 1 FROM session_locks WHERE id = ? AND token = ? AND expires_at > ?", (session_id, fence, now)
        ).fetchone()
        if held is None:
            raise lease_lost(session_id)

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        # Indexed on expires_at, and in batches, so a sweep never holds the write lock for long.
        while self._db.execute(
            "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE expires_at <= ? LIMIT 500)", (now,)
        ).rowcount == 500:
            pass
        # Expired conversations with their messages: their pages are free for new rows (SQLite reuses them).
        while expired := self._db.execute(
            "SELECT id FROM conversations WHERE expires_at <= ? LIMIT 100", (now,)
        ).fetchall():
            def drop(keys: list[tuple[str]] = expired) -> None:
                for (key,) in keys:
                    self._drop(key, whole=False)

            self._transaction(drop)
        self._db.execute("DELETE FROM session_locks WHERE expires_at <= ?", (now,))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` with a read connection of its own, on a read thread: in parallel with other reads and the writes."""
        def read() -> T:
            db = self._readers.get_nowait()  # as many threads as connections: one is always free
            try:
                return fn(db)
            finally:
                if db.in_transaction:  # a failed read leaves no snapshot open
                    db.execute("ROLLBACK")
                self._readers.put(db)

        return await self._run(read, executor=self._read_threads)

    async def _run(self, fn: Callable[[], T], closing: bool = False, executor: ThreadPoolExecutor | None = None) -> T:
        if self._closed and not closing:
            raise RuntimeError("the session store is closed")
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor or self._thread, fn)
        except sqlite3.Error as exc:
            if _disk_full(exc):  # reachable, only out of space
                self.failure = None
                raise store_full(self._limit_reached(exc)) from exc
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("SQLite session store %s failed: %s", self.path, self.failure)
            raise StoreUnavailable(f"the session store failed ({self.failure}); retry shortly") from exc
        except StoreFull:
            self.failure = None
            raise
        self.failure = None
        return result

    def __repr__(self) -> str:
        return f"SQLiteSessionStore({str(self.path)!r})"


class _NoRoom(sqlite3.OperationalError):
    """A write the disk could take now but not copy from the log into the database afterwards."""


def _disk_full(exc: sqlite3.Error) -> bool:
    return isinstance(exc, _NoRoom) or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
