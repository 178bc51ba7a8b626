"""Sessions in Redis: for several server processes, on one host or many, sharing one store."""

from __future__ import annotations

import json
import secrets
from typing import Any

import redis.asyncio as aioredis

from .store import SessionData, dump_json

# Compare-and-delete / compare-and-pexpire: a holder only ever releases or extends its own lock,
# even if its lease ran out and someone else took the lock meanwhile.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"


class RedisSessionStore:
    """Values are JSON strings under ``<prefix>session:<id>`` with Redis's own TTL; the lock is
    ``<prefix>lock:<id>``, taken with ``SET NX PX`` so its lease expires inside Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str = "chatstream:") -> None:
        self.client = client
        self.prefix = prefix
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)

    @classmethod
    def from_url(cls, url: str, prefix: str = "chatstream:", **options: Any) -> RedisSessionStore:
        """``redis://[:password@]host:port/db`` or ``rediss://`` (TLS); no connection is made yet."""
        return cls(aioredis.Redis.from_url(url, **options), prefix=prefix)

    async def get(self, session_id: str) -> SessionData | None:
        text = await self.client.get(self._key(session_id))
        return None if text is None else json.loads(text)

    async def set(self, session_id: str, data: SessionData, ttl_s: float) -> None:
        # PX rather than EX: the same per-key TTL, but a fraction of a second is allowed too.
        await self.client.set(self._key(session_id), dump_json(data), px=_ms(ttl_s))

    async def delete(self, session_id: str) -> None:
        await self.client.delete(self._key(session_id))

    async def acquire_lock(self, session_id: str, lease_s: float) -> str | None:
        token = secrets.token_urlsafe(16)
        taken = await self.client.set(self._lock_key(session_id), token, nx=True, px=_ms(lease_s))
        return token if taken else None

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        return bool(await self._refresh(keys=[self._lock_key(session_id)], args=[token, _ms(lease_s)]))

    async def release_lock(self, session_id: str, token: str) -> None:
        await self._release(keys=[self._lock_key(session_id)], args=[token])

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
