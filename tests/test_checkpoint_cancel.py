"""A turn ends even when its store's client loses the cancel that stops the reply's checkpoints.

Found by the Redis soak (benchmarks/soak.py, CLIENT PAUSE): the checkpoint task of a turn whose
reply had finished was cancelled while its save waited for Redis; redis-py lost the cancel, the
task went back to sleep "cancelling", the turn waited for it forever and the client's stream
hung (3 streams in a 40 s run). The store below loses the cancel in the same way, every time.
"""

from __future__ import annotations

import asyncio

import httpx
from conftest import parse_sse

from chatstream import ChatStream
from chatstream.session import MemorySessionStore


class CancelLosingStore(MemorySessionStore):
    """A store whose writes take a while and swallow a cancel that arrives meanwhile, as a client
    library with that bug does (the write then completes)."""

    async def set(self, session_id: str, data: dict, ttl_s: float, fence: str | None = None) -> None:
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            pass
        await super().set(session_id, data, ttl_s, fence)


def test_a_reply_ends_when_the_store_client_loses_the_checkpoints_cancel(serve: object) -> None:
    from fastapi import FastAPI

    chat_stream = ChatStream(use_mock_response=True, session_store=CancelLosingStore(), session_secret="test",
                             mock_token_delay=0.02)
    chat_stream.service.checkpoint_interval_s = 0.05  # a checkpoint is being saved when the reply ends
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    url = serve(app).url  # type: ignore[operator]
    with httpx.Client(base_url=url, timeout=httpx.Timeout(10)) as client:
        for n in range(3):
            # The old code: ReadTimeout (the turn waits for its checkpoint task forever).
            events = parse_sse(client.post("/chat_stream", json={"user_input": f"hello {n}", "max_tokens": 12}).text)
            assert events[-1][0] == "done", events[-3:]
        assert len(client.get("/history").json()["messages"]) == 6
