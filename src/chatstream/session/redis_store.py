"""Sessions in Redis: for several server processes, on one host or many, sharing one store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from ..errors import StoreFull, StoreUnavailable
from .store import SessionData, dump_json, lease_lost

logger = logging.getLogger("chatstream.session")

# Compare-and-delete / compare-and-pexpire: a holder only ever releases or extends its own lock,
# even if its lease ran out and someone else took the lock meanwhile.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
# Fenced writes: the lock (KEYS[2]) must still hold the writer's token, checked in the same atomic
# script that writes, so a holder whose lease ran out while it stalled cannot overwrite anything.
_FENCED_SET = (
    "if redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end "
    "redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1"
)
_FENCED_DELETE = "if redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end redis.call('del', KEYS[1]) return 1"
# Values larger than this are parsed and serialized on a worker thread rather than the event loop.
_BIG_VALUE = 64 * 1024


class RedisSessionStore:
    """Values are JSON strings under ``<prefix>session:<id>`` with Redis's own TTL; the lock is
    ``<prefix>lock:<id>``, taken with ``SET NX PX`` so its lease expires inside Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str = "chatstream:", *,
                 max_session_bytes: int | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.max_session_bytes = max_session_bytes
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)
        self._fenced_set = client.register_script(_FENCED_SET)
        self._fenced_delete = client.register_script(_FENCED_DELETE)
        self.failure: str | None = None  # why the last operation failed, until one succeeds (for /health)

    @classmethod
    def from_url(cls, url: str, prefix: str = "chatstream:", *, max_session_bytes: int | None = None,
                 **options: Any) -> RedisSessionStore:
        """``redis://[:password@]host:port/db`` or ``rediss://`` (TLS); no connection is made yet."""
        return cls(aioredis.Redis.from_url(url, **options), prefix=prefix, max_session_bytes=max_session_bytes)

    async def get(self, session_id: str) -> SessionData | None:
        with self._errors():
            text = await self.client.get(self._key(session_id))
        if text is None:
            return None
        return await asyncio.to_thread(json.loads, text) if len(text) > _BIG_VALUE else json.loads(text)

    async def set(self, session_id: str, data: SessionData, ttl_s: float, fence: str | None = None) -> None:
        text = dump_json(data, self.max_session_bytes)
        # PX rather than EX: the same per-key TTL, but a fraction of a second is allowed too.
        with self._errors():
            if fence is None:
                await self.client.set(self._key(session_id), text, px=_ms(ttl_s))
                return
            written = await self._fenced_set(keys=[self._key(session_id), self._lock_key(session_id)],
                                             args=[fence, text, _ms(ttl_s)])
        if not written:
            raise lease_lost(session_id)

    async def delete(self, session_id: str, fence: str | None = None) -> None:
        with self._errors():
            if fence is None:
                await self.client.delete(self._key(session_id))
                return
            deleted = await self._fenced_delete(keys=[self._key(session_id), self._lock_key(session_id)], args=[fence])
        if not deleted:
            raise lease_lost(session_id)

    async def acquire_lock(self, session_id: str, lease_s: float) -> str | None:
        token = secrets.token_urlsafe(16)
        with self._errors():
            taken = await self.client.set(self._lock_key(session_id), token, nx=True, px=_ms(lease_s))
        return token if taken else None

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        with self._errors():
            return bool(await self._refresh(keys=[self._lock_key(session_id)], args=[token, _ms(lease_s)]))

    async def release_lock(self, session_id: str, token: str) -> None:
        with self._errors():
            await self._release(keys=[self._lock_key(session_id)], args=[token])

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Redis's failures as the store's: out of memory is StoreFull, unreachable is StoreUnavailable."""
        try:
            yield
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith("OOM"):
                self.failure = None
                raise StoreFull("the session store is full (Redis maxmemory): delete conversations to free space") from exc
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("Redis session store failed: %s", self.failure)
            raise StoreUnavailable(f"the session store is unreachable ({self.failure}); retry shortly") from exc
        self.failure = None

    async def close(self) -> None:
        await self.client.aclose()

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _lock_key(self, session_id: str) -> str:
        return f"{self.prefix}lock:{session_id}"

    def __repr__(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"
        return f"RedisSessionStore({where!r}, prefix={self.prefix!r})"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
