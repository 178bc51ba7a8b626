"""How long other users' store calls wait while one user reads a big conversation (SQLite store).

    .venv/bin/python -m benchmarks.store_reads [--mb 25] [--seconds 8]

One conversation of ``--mb`` MB (10 KB messages) is read non-stop by one task, as its owner's
``GET /conversations/{id}`` does; meanwhile another task times a small read of another session every
20 ms (what ``/health`` and every other user's request ask of the store). Prints the small reads'
p50/p99/max and the big read's p50. Run it against two versions (``PYTHONPATH=<their src>``): it
uses only the store API both keep.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from chatstream.session import SQLiteSessionStore


async def run(mb: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteSessionStore(Path(folder) / "sessions.db")
        try:
            count = int(mb * 100)
            await store.set_messages("owner/big", {}, 0, [{"role": "user", "content": f"{n} " + "x" * 10_000}
                                                          for n in range(count)], ttl_s=3600)
            await store.set("other", {"conversations": {}}, ttl_s=3600)
            stop = asyncio.Event()
            big: list[float] = []

            async def owner() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    await store.get_messages("owner/big")
                    big.append(time.perf_counter() - started)

            reading = asyncio.ensure_future(owner())
            small: list[float] = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                await store.get("other")
                small.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
            stop.set()
            await reading
        finally:
            await store.close()
    small.sort()
    print(f"{mb:g} MB conversation read {len(big)} times (p50 {statistics.median(big) * 1000:.0f} ms); "
          f"another session's read, n={len(small)}: p50 {statistics.median(small) * 1000:.2f} ms, "
          f"p99 {small[int(0.99 * (len(small) - 1))] * 1000:.2f} ms, max {small[-1] * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=25.0, help="size of the big conversation")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to time the small reads")
    args = parser.parse_args()
    asyncio.run(run(args.mb, args.seconds))


if __name__ == "__main__":
    main()
