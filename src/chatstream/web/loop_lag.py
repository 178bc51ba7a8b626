"""Measures how late the event loop wakes up: the lag every request on this server feels."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque


class LoopLagMonitor:
    """Sleeps ``interval_s`` in a loop and records how much later than asked it woke up."""

    # A window of ten minutes at the default interval: summaries sort at most this many samples.
    def __init__(self, interval_s: float = 0.01, window: int = 60_000) -> None:
        self.interval_s = interval_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)  # (wall time, lag ms)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = time.perf_counter() - before - self.interval_s
            self._samples.append((time.time(), max(0.0, lag) * 1000.0))

    def summary(self, since: float = 0.0) -> dict[str, float | int]:
        samples = list(self._samples)  # in time order: skip the old ones by bisection
        first = bisect.bisect_left(samples, since, key=lambda sample: sample[0])
        lags = sorted(lag for _, lag in samples[first:])
        if not lags:
            return {"max_ms": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "samples": 0}
        pick = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]  # noqa: E731
        return {"max_ms": round(lags[-1], 3), "p50_ms": round(pick(0.5), 3), "p99_ms": round(pick(0.99), 3), "samples": len(lags)}
