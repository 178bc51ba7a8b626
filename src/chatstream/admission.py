"""Load control: a bounded number of concurrent generations and a bounded wait queue.

Admission decides who may enter the engine; the engine decides what runs in each step.
Waiters are served first come, first served, learn their live queue position, and leave the
queue the moment they are cancelled (client gone), without ever taking a slot.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from .errors import QueueFull

QueueFullError = QueueFull  # the name this module exported before the domain errors


class Ticket:
    """One request's place: waiting in the queue, then holding a slot until released."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self._queue = queue
        self._changed = asyncio.Event()
        self.granted = False
        self.released = False
        self.granted_at: float | None = None

    @property
    def position(self) -> int:
        """1-based place in the wait queue; 0 once a slot is held."""
        return 0 if self.granted else self._queue._position(self)

    async def wait(self, on_position: Callable[[int], Awaitable[None] | None] | None = None) -> None:
        """Wait for a slot, reporting each new queue position. Cancelling leaves the queue."""
        try:
            last = -1
            while not self.granted:
                position = self.position
                if position != last:
                    last = position
                    if on_position is not None:
                        result = on_position(position)
                        if result is not None:
                            await result
                self._changed.clear()
                if not self.granted and self.position == last:
                    await self._changed.wait()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the slot back (or leave the queue). Safe to call more than once."""
        if not self.released:
            self.released = True
            self._queue._release(self)


class AdmissionQueue:
    """``concurrency`` slots and a FIFO wait queue of at most ``queue_size`` tickets."""

    def __init__(self, concurrency: int, queue_size: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency (num_of_concurrent_executions) must be >= 1")
        if queue_size < 0:
            raise ValueError("queue_size (max_queue_size) must be >= 0")
        self.concurrency = concurrency
        self.queue_size = queue_size
        self._running = 0
        self._waiters: deque[Ticket] = deque()
        # When recent slots were given back: the measured service rate, for Retry-After.
        self._releases: deque[float] = deque(maxlen=64)
        self._avg_hold_s: float | None = None

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> Ticket:
        """A ticket that holds a slot at once or waits in the queue; QueueFullError if neither."""
        ticket = Ticket(self)
        if self._running < self.concurrency and not self._waiters:
            self._grant(ticket)
        elif len(self._waiters) < self.queue_size:
            self._waiters.append(ticket)
        else:
            raise QueueFull(self.retry_after())
        return ticket

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free, from the measured service rate.

        The rate is how fast slots were given back lately (releases per second); before there is
        any, how long a slot is usually held; before that, one second.
        """
        now = time.monotonic()
        recent = [t for t in self._releases if now - t < 60.0]
        if len(recent) >= 2 and recent[-1] > recent[0]:
            rate = (len(recent) - 1) / max(now - recent[0], recent[-1] - recent[0])
            return max(1, math.ceil(1 / rate))  # the next place frees after one more release
        if self._avg_hold_s is not None:
            return max(1, math.ceil(self._avg_hold_s / self.concurrency))
        return 1

    def _position(self, ticket: Ticket) -> int:
        try:
            return self._waiters.index(ticket) + 1
        except ValueError:
            return 0

    def _grant(self, ticket: Ticket) -> None:
        self._running += 1
        ticket.granted = True
        ticket.granted_at = time.monotonic()
        ticket._changed.set()

    def _release(self, ticket: Ticket) -> None:
        if ticket.granted:
            self._running -= 1
            now = time.monotonic()
            self._releases.append(now)
            if ticket.granted_at is not None:
                held = now - ticket.granted_at
                self._avg_hold_s = held if self._avg_hold_s is None else 0.8 * self._avg_hold_s + 0.2 * held
        else:
            try:
                self._waiters.remove(ticket)
            except ValueError:
                pass
        while self._waiters and self._running < self.concurrency:
            self._grant(self._waiters.popleft())
        for waiter in self._waiters:  # positions moved up
            waiter._changed.set()
