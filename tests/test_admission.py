"""AdmissionQueue on its own: slots, FIFO waiting, positions, cancellation, overload."""

from __future__ import annotations

import asyncio

import pytest

from chatstream import AdmissionQueue, QueueFullError


async def test_waiters_are_served_first_come_first_served():
    queue = AdmissionQueue(concurrency=1, queue_size=3)
    holder = queue.try_enter()
    assert holder.granted and queue.running == 1
    tickets = [queue.try_enter() for _ in range(3)]
    assert [t.position for t in tickets] == [1, 2, 3]
    with pytest.raises(QueueFullError) as exc:
        queue.try_enter()
    assert exc.value.retry_after >= 1

    order: list[int] = []

    async def wait(i: int) -> None:
        await tickets[i].wait()  # no position callback: must still wait, not spin
        order.append(i)
        await asyncio.sleep(0.01)
        tickets[i].release()

    tasks = [asyncio.create_task(wait(i)) for i in (2, 0, 1)]
    await asyncio.sleep(0.02)
    assert order == []
    holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_positions_are_reported_and_a_cancelled_waiter_leaves_the_queue():
    queue = AdmissionQueue(concurrency=1, queue_size=2)
    holder = queue.try_enter()
    first, second = queue.try_enter(), queue.try_enter()
    seen: list[int] = []
    waiting = asyncio.create_task(second.wait(seen.append))
    first_waiting = asyncio.create_task(first.wait())
    await asyncio.sleep(0.01)
    first_waiting.cancel()  # the client in front leaves
    await asyncio.sleep(0.01)
    assert seen == [2, 1] and queue.waiting == 1
    holder.release()
    await asyncio.wait_for(waiting, 5)
    assert second.granted and queue.running == 1
    second.release()
    second.release()  # idempotent
    assert queue.running == 0


def test_limits_are_validated():
    with pytest.raises(ValueError):
        AdmissionQueue(0, 1)
    with pytest.raises(ValueError):
        AdmissionQueue(1, -1)
