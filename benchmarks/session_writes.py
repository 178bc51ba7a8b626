"""Bytes a long conversation writes to the SQLite session store: the write amplification of saving turns.

    .venv/bin/python -m benchmarks.session_writes [--turns 300] [--chars 15000] [--checkpoint-s 0.05]

One session, one conversation, ``--turns`` turns over HTTP (the mock engine: ``--tokens`` tokens a
reply, ``--token-delay`` s apart) with a ``--chars``-character user message each, so the
conversation grows to ``turns x chars`` characters. While each reply streams, a checkpoint saves
it every ``--checkpoint-s`` s. Prints what this process wrote to disk (``write_bytes`` of
/proc/self/io: the store's WAL and its checkpoints into the database file), the file sizes at the
end and the wall time. Run it against two versions (``PYTHONPATH=<their src>``) to compare layouts;
it only uses the HTTP API, which both keep.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from chatstream import ChatStream
from chatstream.service import ChatService
from chatstream.session import SQLiteSessionStore
from chatstream.settings import Settings


def disk_writes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--chars", type=int, default=15_000, help="characters of each user message")
    parser.add_argument("--tokens", type=int, default=16, help="tokens of each (mock) reply")
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--checkpoint-s", type=float, default=0.05, help="seconds between checkpoints of a reply")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chatstream-writes-") as folder:
        path = Path(folder) / "sessions.db"
        store = SQLiteSessionStore(path)
        settings = Settings(mock=True, session_secret="w" * 32, mock_token_delay=args.token_delay,
                            max_new_tokens=args.tokens, max_history_messages=2 * args.turns + 2, context_len=32_768,
                            max_input_chars=args.chars + 100, session_max_bytes=2**30)
        service = ChatService(settings, session_store=store)
        service.checkpoint_interval_s = args.checkpoint_s
        chat_stream = ChatStream(service=service)
        app = FastAPI()
        chat_stream.append_middlewares(app)
        chat_stream.append_apis(app)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                before, started = disk_writes(), time.monotonic()
                for n in range(args.turns):
                    text = (f"turn {n} " + "hello world " * (args.chars // 12 + 1))[: args.chars]  # ~6 chars a token
                    reply = client.post("/chat_stream", json={"user_input": text}).text
                    if "event: done" not in reply:
                        raise SystemExit(f"turn {n} failed: {reply[-300:]}")
                written, elapsed = disk_writes() - before, time.monotonic() - started
                count = len(client.get("/history").json()["messages"])
        finally:
            server.should_exit = True
            thread.join(timeout=30)
        sizes = {p.name: p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith("sessions.db")}
        print(f"{args.turns} turns, {args.chars} chars each ({count} messages, "
              f"{args.turns * args.chars / 1e6:.1f} MB of text): wrote {written / 1e6:.1f} MB to disk "
              f"({written / max(1, args.turns * args.chars):.1f}x the text) in {elapsed:.0f} s; "
              + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items())))


if __name__ == "__main__":
    main()
