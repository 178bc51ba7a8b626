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
from .store import SessionData, dump_json, dump_rows, group, lease_lost, store_full, too_large, too_many_held

logger = logging.getLogger("chatstream.session")

# Compare-and-delete / compare-and-pexpire: a holder only ever releases or extends its own lock,
# even if its lease ran out and someone else took the lock meanwhile.
# KEYS[2] is the session's sorted set of replies streaming (``held:<session>``, lock name -> lease
# end): kept with the lock, so the per-session limit of parallel replies holds across processes.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('zrem', KEYS[2], ARGV[2]) return redis.call('del', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zadd', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[3])
if redis.call('pttl', KEYS[2]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[2], ARGV[2]) end
return redis.call('pexpire', KEYS[1], ARGV[2])
"""
# Take the lock unless the session already holds ARGV[4] others: 1 taken, 0 held by another, -1 at the limit.
_ACQUIRE_LIMITED = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[2], '-inf', now)
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local held = redis.call('zcard', KEYS[2])
if redis.call('zscore', KEYS[2], ARGV[3]) then held = held - 1 end
if held >= tonumber(ARGV[4]) then return -1 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('zadd', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
if redis.call('pttl', KEYS[2]) < tonumber(ARGV[2]) then redis.call('pexpire', KEYS[2], ARGV[2]) end
return 1
"""
# Every write is one script: the fence (the lock, KEYS[2], must still hold the writer's token, so a
# holder whose lease ran out while it stalled cannot overwrite anything), the byte accounting and
# the quotas, and the write itself, atomically. Bytes are counted per key in the hash
# ``size:<session>`` (a session's quota sums it) and in the counter ``bytes`` (the store's); the
# sorted set ``expiry`` (key -> expiry, ms) lets each write subtract what Redis's TTLs freed (up
# to 100 keys a write; a size hash has no TTL of its own and goes when its last key is subtracted).
# KEYS: 1 the value, 2 its lock, 3 size:<session>, 4 bytes, 5 expiry, 6 the other form of the value
# (a conversation stored whole when writing rows, and rows when writing whole), deleted.
# ARGV: 1 fence ('' none), 2 ttl ms, 3 the key (its name in size/expiry), 4 session quota (0: none),
# 5 store quota (0: none), 6 the key prefix, 7 count the session quota ('1'/'0'), then per script.
_ACCOUNT = """
if ARGV[1] ~= '' and redis.call('get', KEYS[2]) ~= ARGV[1] then return {'lease'} end
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs(redis.call('zrangebyscore', KEYS[5], '-inf', now, 'LIMIT', 0, 100)) do
  local cut = string.find(key, '/', 1, true)
  local sizes = ARGV[6] .. 'size:' .. (cut and string.sub(key, 1, cut - 1) or key)
  local gone = tonumber(redis.call('hget', sizes, key) or '0')
  redis.call('hdel', sizes, key)
  redis.call('decrby', KEYS[4], gone)
  redis.call('zrem', KEYS[5], key)
end
local function account(size)
  local old = tonumber(redis.call('hget', KEYS[3], ARGV[3]) or '0')
  if size > old then
    if tonumber(ARGV[4]) > 0 and ARGV[7] == '1' then
      local total = size - old
      for _, v in ipairs(redis.call('hvals', KEYS[3])) do total = total + tonumber(v) end
      if total > tonumber(ARGV[4]) then return {'session', total} end
    end
    if tonumber(ARGV[5]) > 0 and tonumber(redis.call('get', KEYS[4]) or '0') + size - old > tonumber(ARGV[5]) then
      return {'store'}
    end
  end
  return nil
end
local function commit(size, ttl)
  local old = tonumber(redis.call('hget', KEYS[3], ARGV[3]) or '0')
  redis.call('hset', KEYS[3], ARGV[3], size)
  redis.call('incrby', KEYS[4], size - old)
  redis.call('zadd', KEYS[5], now + ttl, ARGV[3])
  redis.call('del', KEYS[6])
end
"""
# ARGV[8]: the value.
_SET = _ACCOUNT + """
local size = string.len(ARGV[8])
local refused = account(size)
if refused then return refused end
commit(size, tonumber(ARGV[2]))
redis.call('set', KEYS[1], ARGV[8], 'PX', ARGV[2])
return {'ok'}
"""
# KEYS[1] is the hash: 'h' the head, 'n' the count, '0', '1', ... the messages.
# ARGV[8]: start, ARGV[9]: head, ARGV[10..]: the messages from start on.
_SET_MESSAGES = _ACCOUNT + """
local n = tonumber(redis.call('hget', KEYS[1], 'n') or '0')
local start = tonumber(ARGV[8])
if start > n then return {'gap', n} end
local size = string.len(ARGV[9])
for i = 0, start - 1 do size = size + redis.call('hstrlen', KEYS[1], tostring(i)) end
local count = start
for i = 10, #ARGV do size = size + string.len(ARGV[i]); count = count + 1 end
local refused = account(size)
if refused then return refused end
commit(size, tonumber(ARGV[2]))
for i = count, n - 1 do redis.call('hdel', KEYS[1], tostring(i)) end
redis.call('hset', KEYS[1], 'h', ARGV[9], 'n', count)
local fields = {}
for i = 10, #ARGV do
  table.insert(fields, tostring(start + i - 10)); table.insert(fields, ARGV[i])
  if #fields >= 1000 then redis.call('hset', KEYS[1], unpack(fields)); fields = {} end
end
if #fields > 0 then redis.call('hset', KEYS[1], unpack(fields)) end
redis.call('pexpire', KEYS[1], ARGV[2])
return {'ok'}
"""
_DELETE = _ACCOUNT + """
commit(0, 0)
redis.call('hdel', KEYS[3], ARGV[3])
redis.call('zrem', KEYS[5], ARGV[3])
redis.call('del', KEYS[1])
return {'ok'}
"""
# Values larger than this are parsed and serialized on a worker thread rather than the event loop.
_BIG_VALUE = 64 * 1024


class RedisSessionStore:
    """Documents are JSON strings under ``<prefix>session:<id>`` with Redis's own TTL; a
    conversation in rows is the hash ``<prefix>conv:<id>`` (one field per message); the lock is
    ``<prefix>lock:<id>``, taken with ``SET NX PX`` so its lease expires inside Redis.

    ``max_bytes`` bounds the bytes this store counts (its values; Redis's own overhead is for
    ``maxmemory``). Values written by versions that did not count bytes count from their next write.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "chatstream:", *,
                 max_session_bytes: int | None = None, max_bytes: int | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.max_session_bytes = max_session_bytes
        self.max_bytes = max_bytes
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)
        self._acquire_limited = client.register_script(_ACQUIRE_LIMITED)
        self._set = client.register_script(_SET)
        self._set_messages = client.register_script(_SET_MESSAGES)
        self._delete = client.register_script(_DELETE)
        self.failure: str | None = None  # why the last operation failed, until one succeeds (for /health)

    @classmethod
    def from_url(cls, url: str, prefix: str = "chatstream:", *, max_session_bytes: int | None = None,
                 max_bytes: int | None = None, **options: Any) -> RedisSessionStore:
        """``redis://[:password@]host:port/db`` or ``rediss://`` (TLS); no connection is made yet."""
        return cls(aioredis.Redis.from_url(url, **options), prefix=prefix, max_session_bytes=max_session_bytes,
                   max_bytes=max_bytes)

    async def get(self, session_id: str) -> SessionData | None:
        with self._errors():
            text = await self.client.get(self._key(session_id))
        if text is None:
            return None
        return await asyncio.to_thread(json.loads, text) if len(text) > _BIG_VALUE else json.loads(text)

    async def set(self, session_id: str, data: SessionData, ttl_s: float, fence: str | None = None) -> None:
        text = dump_json(data, self.max_session_bytes)
        # PX rather than EX: the same per-key TTL, but a fraction of a second is allowed too.
        await self._write(self._set, session_id, self._key(session_id), self._conv_key(session_id), fence, ttl_s,
                          [text])

    async def delete(self, session_id: str, fence: str | None = None) -> None:
        await self._write(self._delete, session_id, self._key(session_id), self._conv_key(session_id), fence, 0, [])

    async def get_messages(self, key: str) -> SessionData | None:
        with self._errors():
            fields = await self.client.hgetall(self._conv_key(key))
        if not fields:
            return await self.get(key)  # stored whole by an older version, or nothing
        big = sum(len(value) for value in fields.values()) > _BIG_VALUE
        return await asyncio.to_thread(_assemble, fields) if big else _assemble(fields)

    async def set_messages(self, key: str, head: SessionData, start: int, messages: list[SessionData],
                           ttl_s: float, fence: str | None = None, *, migrating: bool = False) -> None:
        head_text, rows = dump_rows(head, messages)
        with self._errors():
            rowed = await self.client.exists(self._conv_key(key))
        if not rowed:
            # Stored whole by an older version: its messages become rows in the same script (this
            # writer holds the conversation's lock, so nobody else rewrites it meanwhile).
            stored = await self.get(key)
            if stored is not None:
                old = [m for m in stored.get("messages") or [] if isinstance(m, dict)]
                if start > len(old):
                    raise ValueError(f"messages from position {start}: the conversation holds {len(old)}")
                _, old_rows = await asyncio.to_thread(dump_rows, {}, old[:start])  # off the loop: it may be large
                start, rows = 0, old_rows + rows
        result = await self._write(self._set_messages, key, self._conv_key(key), self._key(key), fence, ttl_s,
                                   [start, head_text, *rows], count_quota=not migrating)
        if result[0] == "gap":
            raise ValueError(f"messages from position {start}: the conversation holds {int(result[1])}")

    async def acquire_lock(self, session_id: str, lease_s: float, *, max_in_session: int | None = None) -> str | None:
        token = secrets.token_urlsafe(16)
        with self._errors():
            if max_in_session is None:
                taken = await self.client.set(self._lock_key(session_id), token, nx=True, px=_ms(lease_s))
            else:
                taken = await self._acquire_limited(keys=[self._lock_key(session_id), self._held_key(session_id)],
                                                    args=[token, _ms(lease_s), session_id, max_in_session])
        if taken == -1:
            raise too_many_held(session_id, max_in_session or 0)
        return token if taken else None

    async def refresh_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        with self._errors():
            return bool(await self._refresh(keys=[self._lock_key(session_id), self._held_key(session_id)],
                                            args=[token, _ms(lease_s), session_id]))

    async def release_lock(self, session_id: str, token: str) -> None:
        with self._errors():
            await self._release(keys=[self._lock_key(session_id), self._held_key(session_id)], args=[token, session_id])

    async def lock_held(self, session_id: str) -> bool:
        with self._errors():
            return bool(await self.client.exists(self._lock_key(session_id)))  # the key expires with the lease

    async def _write(self, script: Any, key: str, value_key: str, other_key: str, fence: str | None, ttl_s: float,
                     args: list[Any], count_quota: bool = True) -> list[Any]:
        session = group(key)
        with self._errors():
            result = await script(
                keys=[value_key, self._lock_key(key), f"{self.prefix}size:{session}", f"{self.prefix}bytes",
                      f"{self.prefix}expiry", other_key],
                args=[fence or "", _ms(ttl_s), key, self.max_session_bytes or 0, self.max_bytes or 0, self.prefix,
                      "1" if count_quota else "0", *args])
        status = _text(result[0])
        if status == "lease":
            raise lease_lost(key)
        if status == "session":
            assert self.max_session_bytes is not None
            raise too_large(key, int(result[1]), self.max_session_bytes)
        if status == "store":
            raise store_full(self.max_bytes)
        return [status, *result[1:]]

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

    def _held_key(self, key: str) -> str:
        return f"{self.prefix}held:{group(key)}"

    def _conv_key(self, key: str) -> str:
        return f"{self.prefix}conv:{key}"

    def _lock_key(self, session_id: str) -> str:
        return f"{self.prefix}lock:{session_id}"

    def __repr__(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"
        return f"RedisSessionStore({where!r}, prefix={self.prefix!r})"


def _assemble(raw: dict[Any, Any]) -> SessionData:
    fields = {_text(k): v for k, v in raw.items()}
    data: SessionData = json.loads(fields["h"])
    data["messages"] = [json.loads(fields[str(n)]) for n in range(int(fields["n"]))]
    return data


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
