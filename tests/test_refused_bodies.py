"""A request refused while its body is still arriving gets its answer, not a connection reset.

The defect (issue 21): the server answered 413 (or 401) and closed while the client was still
sending; the unread bytes made the kernel reset the connection, so httpx's AsyncClient saw
``ReadError`` and the OpenAI SDK ``APIConnectionError``, which it retried twice. Now the server
reads and discards the rest for ``--body-linger-s`` / ``--body-linger-bytes`` first.

Each test runs ``create_app`` (the mock engine) on a real uvicorn server on 127.0.0.1, built by
``build_uvicorn_config`` as ``chatstream serve`` builds it, and counts requests with the app's own
``chatstream_http_requests`` counter.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from conftest import live_server, wait_until
from http_helpers import config_for, configured_server, read_until_closed, status_of
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatstream.settings import Settings
from chatstream.web.app import create_app
from chatstream.web.body_drain import BodyDrainMiddleware
from chatstream.web.limits import BodyLimitMiddleware

MB = 1_000_000
LIMIT = 4 * 2**20  # the default --max-body-bytes
KEY = "test-key-21"


class Server:
    def __init__(self, **settings: object) -> None:
        self.app = create_app(Settings(mock=True, mock_token_delay=0.0, **settings))
        self._running = configured_server(config_for(self.app))

    def __enter__(self) -> Server:
        server = self._running.__enter__()
        self.url, self.port = server.url, server.port
        return self

    def __exit__(self, *exc: object) -> None:
        self._running.__exit__(None, None, None)

    def requests(self, route: str, at_least: float = 0) -> float:
        """Requests the app answered on ``route``, whatever their status, once there are ``at_least``
        (the count goes up just after the answer has gone out)."""
        wait_until(lambda: self._count(route) >= at_least, timeout=5)
        return self._count(route)

    def _count(self, route: str) -> float:
        registry = self.app.state.service.metrics.registry
        return sum(sample.value for metric in registry.collect() if metric.name == "chatstream_http_requests"
                   for sample in metric.samples
                   if sample.name.endswith("_total") and sample.labels["route"] == route)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # A generous time bound: on a loaded test machine an in-process 100 MB upload may take seconds.
    with Server(body_linger_s=60) as running:
        yield running


def chat_body(size: int) -> bytes:
    return b'{"user_input": "' + b"x" * size + b'"}'


TOO_LARGE = f"The request body is larger than {LIMIT} bytes."


@pytest.mark.parametrize("size", [10 * MB, 100 * MB], ids=["10MB", "100MB"])
async def test_httpx_async_client_reads_the_413_of_a_body_over_the_limit(server: Server, size: int) -> None:
    body = chat_body(size)
    before = {route: server.requests(route) for route in ("/chat_stream", "/v1/chat/completions")}
    async with httpx.AsyncClient(timeout=60) as client:
        seed = await client.post(server.url + "/chat_stream", content=body,
                                 headers={"Content-Type": "application/json"})
        openai_face = await client.post(server.url + "/v1/chat/completions", content=body,
                                        headers={"Content-Type": "application/json"})
    assert seed.status_code == 413
    assert seed.json() == {"error": "request_too_large", "message": TOO_LARGE}
    assert openai_face.status_code == 413
    assert openai_face.json() == {"error": {"message": TOO_LARGE, "type": "invalid_request_error",
                                            "param": None, "code": "request_too_large"}}
    assert seed.headers["connection"] == openai_face.headers["connection"] == "close"
    assert {route: server.requests(route, at_least=n + 1) - n for route, n in before.items()} == {
        "/chat_stream": 1, "/v1/chat/completions": 1}


async def test_a_chunked_body_gets_its_413_when_its_bytes_pass_the_limit(server: Server) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"user_input": "'
        for _ in range(10 * MB // 65536):
            yield b"x" * 65536
        yield b'"}'

    async with httpx.AsyncClient(timeout=60) as client:
        refused = await client.post(server.url + "/chat_stream", content=chunks(),
                                    headers={"Content-Type": "application/json"})
    assert refused.status_code == 413
    assert refused.json() == {"error": "request_too_large", "message": TOO_LARGE}


@pytest.mark.parametrize("size", [10 * MB, 100 * MB], ids=["10MB", "100MB"])
async def test_the_openai_sdk_gets_its_413_and_does_not_retry(server: Server, size: int) -> None:
    before = server.requests("/v1/chat/completions")
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=2, timeout=60)
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x" * size}])
    await client.close()
    assert refused.value.status_code == 413
    assert refused.value.body == {"message": TOO_LARGE, "type": "invalid_request_error",
                                  "param": None, "code": "request_too_large"}
    assert server.requests("/v1/chat/completions", at_least=before + 1) - before == 1  # a connection error would be retried twice


async def test_requests_with_their_whole_body_read_keep_their_connection(server: Server) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(2):
            answer = await client.post(server.url + "/v1/chat/completions", json={
                "model": "mock", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200
            assert "connection" not in answer.headers


# -- the bounds ------------------------------------------------------------------------------

def slow_upload(port: int, head: bytes, seconds: float, rate: int = 2 * MB) -> tuple[bytes, float, float, int]:
    """Send ``head`` then body bytes at ``rate`` per second, reading what comes back, until the server
    closes (or ``seconds`` pass). Returns what was read, when its first byte came, when the connection
    ended (both from the start) and the body bytes sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    sock.setblocking(False)
    started = time.monotonic()
    answer, first, sent, chunk = b"", -1.0, 0, b"x" * (rate // 50)
    try:
        while time.monotonic() - started < seconds:
            try:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                first = first if first >= 0 else time.monotonic() - started
            except BlockingIOError:
                pass
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                pass
            time.sleep(0.02)
    except OSError:  # reset: the server closed with bytes unread
        pass
    finally:
        sock.close()
    return answer, first, time.monotonic() - started, sent


def test_a_slow_sender_reads_its_413_at_once_and_is_cut_off_after_the_linger_time() -> None:
    with Server(body_linger_s=1.5) as server:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (100 * MB))
        answer, first, ended, sent = slow_upload(server.port, head, seconds=20)
    assert status_of(answer) == 413 and b"request_too_large" in answer
    assert 0 <= first < 1.0  # the answer is sent before the lingering reads
    assert 1.4 < ended < 6  # kept reading for --body-linger-s, then closed: not for the whole 50 s upload
    assert sent < 20 * MB


@pytest.mark.parametrize(("status", "headers"), [
    (401, b""),
    (403, b"Cookie: chatstream_session=x\r\nOrigin: https://elsewhere.example\r\n"),
], ids=["401", "403"])
def test_a_slow_sender_after_a_401_or_403_is_cut_off_after_the_linger_time(status: int, headers: bytes) -> None:
    """Before, uvicorn went on reading a refused body for as long as the client kept sending."""
    with Server(api_key=KEY if status == 401 else None, body_linger_s=1.5) as server:
        head = (b"POST /chat_stream HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n%s"
                b"Content-Length: %d\r\n\r\n" % (headers, 100 * MB))
        answer, first, ended, _ = slow_upload(server.port, head, seconds=20)
    assert status_of(answer) == status
    assert 0 <= first < 1.0
    assert 1.4 < ended < 6
    assert b"connection: close" in answer.lower()


@pytest.mark.parametrize("size", [10 * MB, 100 * MB], ids=["10MB", "100MB"])
async def test_a_401_with_a_large_body_arrives_as_a_401(size: int) -> None:
    with Server(api_key=KEY, body_linger_s=60) as server:
        async with httpx.AsyncClient(timeout=60) as client:
            seed = await client.post(server.url + "/chat_stream", content=chat_body(size))
        refused = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=2, timeout=60)
        with pytest.raises(openai.AuthenticationError) as wrong_key:
            await refused.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x" * size}])
        await refused.close()
        assert server.requests("/v1/chat/completions", at_least=1) == 1
    assert seed.status_code == 401 and seed.json()["error"] == "unauthorized"
    assert wrong_key.value.status_code == 401 and wrong_key.value.code == "invalid_api_key"


def test_a_declared_rest_over_the_linger_bytes_is_closed_at_once() -> None:
    with Server(body_linger_s=60, body_linger_bytes=8 * MB) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /chat_stream HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (10 * MB))
        started = time.monotonic()
        answer = read_until_closed(sock)
        sock.close()
    assert status_of(answer) == 413
    assert time.monotonic() - started < 5  # not the 60 s linger: the client would be reset anyway


def test_a_client_waiting_for_100_continue_gets_its_413_and_the_close_at_once() -> None:
    """curl asks before sending a large body; answered with a 413, it sends nothing to linger for."""
    with Server(body_linger_s=60) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /chat_stream HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % (10 * MB))
        started = time.monotonic()
        answer = read_until_closed(sock)
        sock.close()
    assert status_of(answer) == 413 and b"100 Continue" not in answer
    assert time.monotonic() - started < 5


async def test_in_a_library_app_the_middleware_added_last_does_the_same() -> None:
    """An app of one's own with chatstream's body limit, served by plain uvicorn."""

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"received": len(await request.body())})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=4096)
    app.add_middleware(BodyDrainMiddleware, linger_s=60)
    with live_server(app) as server:
        async with httpx.AsyncClient(timeout=60) as client:
            refused = await client.post(server.url + "/echo", content=b"x" * (10 * MB))
            accepted = await client.post(server.url + "/echo", content=b"x" * 4096)
    assert refused.status_code == 413 and refused.json()["error"] == "request_too_large"
    assert accepted.json() == {"received": 4096}
