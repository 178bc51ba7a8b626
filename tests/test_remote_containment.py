"""A hostile or broken upstream engine (``--engine-url``) is contained by the front.

The upstream is a small real server (Starlette on uvicorn, 127.0.0.1) whose answer depends on
the user's message: it ignores ``max_tokens``, sends an endless line, a huge delta, a number as
text, log-probabilities that are not numbers or more of them than asked for, or a 500. The front must end each such turn itself (``length`` or an ``error`` event), close
the upstream request, keep its memory bounded, and keep serving everybody else.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from conftest import wait_until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chatstream import Settings
from chatstream.web.app import create_app

MAX_TOKENS = 16


class FakeUpstream:
    """An OpenAI-compatible server that misbehaves as told by the last user message."""

    def __init__(self) -> None:
        self.open_streams = 0
        self.bytes_sent = 0
        self.requests = 0
        self.last_body: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.app = Starlette(routes=[
            Route("/health", lambda request: JSONResponse({"status": "ok"})),
            Route("/v1/models", lambda request: JSONResponse({"data": [{"id": "fake"}]})),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ])

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests += 1
        self.last_body = body
        behaviour = body["messages"][-1]["content"]
        if behaviour == "fail":
            return JSONResponse({"error": {"message": "this request broke me"}}, status_code=500)
        return StreamingResponse(self._stream(behaviour), media_type="text/event-stream")

    async def _stream(self, behaviour: str) -> AsyncIterator[bytes]:
        with self._lock:
            self.open_streams += 1
        try:
            async for data in self._chunks(behaviour):
                self.bytes_sent += len(data)
                yield data
        finally:
            with self._lock:
                self.open_streams -= 1

    async def _chunks(self, behaviour: str) -> AsyncIterator[bytes]:
        if behaviour == "endless line":
            yield b"data: "
            while True:
                yield b"a" * 65536
                await asyncio.sleep(0)
        if behaviour.startswith("one delta of "):
            yield _chunk(content="x" * int(behaviour.split()[-1]))
        elif behaviour == "a number as text":
            yield _chunk(content="Hello")
            await asyncio.sleep(0.05)
            yield _chunk(content=42)
        elif behaviour == "a NaN logprob":
            yield _chunk(content="Hi", logprobs=[{"token": "Hi", "logprob": float("nan"), "bytes": [72, 105]}])
        elif behaviour == "too many logprobs":
            # Three tokens a chunk, five top entries each and llama.cpp's extra "id": more than asked for.
            # As llama.cpp's server: none at all for top_logprobs 0.
            top = [{"id": i, "token": f"t{i}", "logprob": -1.0 - i, "bytes": None} for i in range(5)]
            entries = [{"id": 1, "token": "w", "logprob": -0.5, "bytes": [119], "top_logprobs": top}] * 3
            for i in range(3):
                yield _chunk(content=f"w{i} ", logprobs=entries if self.last_body.get("top_logprobs") else None)
            yield _chunk(finish_reason="stop")
            yield b"data: [DONE]\n\n"
        else:  # "ignore max_tokens", or an honest short reply
            for i in range(1_000_000 if behaviour == "ignore max_tokens" else 3):
                yield _chunk(content=f"w{i} ")
                await asyncio.sleep(0.001)
            yield _chunk(finish_reason="stop")
            yield b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}\n\ndata: [DONE]\n\n'
            return
        while True:  # a bad answer that keeps the request open: only the front can end it
            yield b": still here\n\n"
            await asyncio.sleep(0.05)


def _chunk(*, content: Any = None, finish_reason: str | None = None, usage: dict[str, int] | None = None,
           logprobs: list[dict[str, Any]] | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    data: dict[str, Any] = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None if logprobs is None else {"content": logprobs}}]}
    if usage:
        data["usage"] = usage
    return f"data: {json.dumps(data)}\n\n".encode()


@pytest.fixture
def upstream(serve: Any) -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    yield fake, serve(fake.app).url


@pytest.fixture
def front(serve: Any, upstream: tuple[FakeUpstream, str]) -> str:
    settings = Settings(engine_url=[upstream[1]], session_store="memory://", session_secret="s",
                        max_new_tokens=MAX_TOKENS, stall_timeout_s=10, concurrency=4)
    url: str = serve(create_app(settings)).url
    assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=30)
    return url


def turn(url: str, text: str, client: httpx.Client | None = None, max_events: int = 500) -> list[tuple[str, Any]]:
    """One /chat_stream turn's events; at most ``max_events`` (an endless reply is a failure, not a hang)."""
    own = client is None
    client = client or httpx.Client(base_url=url, timeout=30)
    events: list[tuple[str, Any]] = []
    try:
        with client.stream("POST", url + "/chat_stream", json={"user_input": text}) as response:
            assert response.status_code == 200, response.read()
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line[5:])))
                    if len(events) >= max_events:
                        break
    finally:
        if own:
            client.close()
    return events


def reply(events: list[tuple[str, Any]]) -> str:
    return "".join(data["text"] for event, data in events if event == "delta")


def test_an_upstream_that_ignores_max_tokens_is_cut_at_max_tokens(upstream, front):
    fake, _ = upstream
    events = turn(front, "ignore max_tokens")
    assert events[-1][0] == "done", events[-3:]
    assert events[-1][1]["finish_reason"] == "length"
    assert events[-1][1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert reply(events) == "".join(f"w{i} " for i in range(MAX_TOKENS))
    assert wait_until(lambda: fake.open_streams == 0, timeout=5)  # the upstream request was closed


def test_an_endless_line_ends_the_turn_with_an_error_and_bounded_memory(upstream, front):
    fake, _ = upstream
    started = time.monotonic()
    events = turn(front, "endless line")
    assert events[-1][0] == "error"
    assert "longer than" in events[-1][1]["message"]
    assert time.monotonic() - started < 5
    assert wait_until(lambda: fake.open_streams == 0, timeout=5)
    # What the upstream got out before the front hung up: the line limit plus socket buffers,
    # not the hundreds of MB an unbounded reader takes in.
    assert fake.bytes_sent < 32 * 2**20


def test_a_huge_delta_is_refused_and_a_long_one_cut_to_the_replys_length(upstream, front):
    fake, _ = upstream
    events = turn(front, "one delta of 10000000")
    assert events[-1][0] == "error" and "longer than" in events[-1][1]["message"]
    assert reply(events) == ""
    # Under the line limit but longer than 16 tokens can be: cut at 16 x 64 characters.
    events = turn(front, "one delta of 100000")
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length"
    assert events[-1][1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert reply(events) == "x" * (MAX_TOKENS * 64)
    assert wait_until(lambda: fake.open_streams == 0, timeout=5)


def test_a_wrong_type_in_a_chunk_is_an_error_event_and_closes_the_upstream_request(upstream, front):
    fake, _ = upstream
    with httpx.Client(base_url=front, timeout=30) as client:
        events = turn(front, "a number as text", client)
        assert [event for event, _ in events] == ["delta", "error"]
        assert "delta.content" in events[-1][1]["message"]
        assert wait_until(lambda: fake.open_streams == 0, timeout=5)
        history = client.get("/history").json()["messages"]
    assert history[-1] == {"role": "assistant", "content": "Hello"}  # the partial reply is kept


def test_one_bad_answer_does_not_eject_the_only_upstream(upstream, front):
    fake, _ = upstream
    assert turn(front, "fail")[-1][0] == "error"
    # Another user, right away: the upstream is still in rotation.
    events = turn(front, "hello")
    assert events[-1][0] == "done", events
    assert reply(events) == "w0 w1 w2 "
    health = httpx.get(front + "/health").json()
    assert [u["healthy"] for u in health["upstreams"]] == [True]
    assert health["upstreams"][0]["failures"] == 1


def test_upstream_logprobs_are_checked_and_kept_to_what_was_asked(upstream, front):
    fake, _ = upstream
    ask = {"logprobs": True, "top_logprobs": 2, "max_tokens": 4}
    r = httpx.post(front + "/v1/chat/completions", timeout=30, json={
        **ask, "messages": [{"role": "user", "content": "too many logprobs"}]})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4  # max_tokens tokens, not the 9 sent
    assert all(len(t["top_logprobs"]) == 2 and "id" not in t for t in content)
    assert content[0]["top_logprobs"][1] == {"token": "t1", "logprob": -2.0, "bytes": None}
    # logprobs without top_logprobs: the upstream is asked for one top entry (llama.cpp sends nothing for 0).
    r = httpx.post(front + "/v1/chat/completions", timeout=30, json={
        **ask, "top_logprobs": None, "messages": [{"role": "user", "content": "too many logprobs"}]})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(t["top_logprobs"] == [] for t in content)
    # NaN is not a log-probability (and would break the client's JSON): the request fails, it is not passed on.
    r = httpx.post(front + "/v1/chat/completions", timeout=30, json={
        **ask, "messages": [{"role": "user", "content": "a NaN logprob"}]})
    assert r.status_code == 500 and "finite logprob" in r.json()["error"]["message"]
    assert wait_until(lambda: fake.open_streams == 0, timeout=5)
