"""Releasing a lock when the store has just gone away. Found by the soak (benchmarks/soak.py,
Redis killed): a turn whose reply was saved, but whose lock release then failed, ended with
``error internal_error`` (after ``done`` when the save had succeeded). The lock needs no release
to be freed (its lease runs out), so a failed release is logged and nothing else.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import wait_until
from test_cli import free_port

from chatstream.session import RedisSessionStore
from chatstream.session.lease import Lease


@pytest.fixture
def doomed_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    assert wait_until(pings, timeout=10)
    client.close()
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_releasing_a_lock_on_a_store_that_went_away_does_not_fail(doomed_redis: tuple[str, subprocess.Popen]) -> None:
    url, proc = doomed_redis

    async def scenario() -> tuple[bool, str | None]:
        store = RedisSessionStore.from_url(url)
        lease = Lease(store, "session/conversation", lease_s=5.0)
        try:
            acquired = await lease.acquire()
            await store.set("session/conversation", {"messages": ["saved"]}, 60, fence=lease.token)
            proc.kill()  # the store goes away after the save, before the release
            proc.wait(timeout=10)
            await lease.release()  # the old code raised StoreUnavailable here
            return acquired, lease.token
        finally:
            await store.close()

    acquired, token = asyncio.run(scenario())
    assert acquired and token is None
