"""Body size and read-time limits, request-head timeouts, the connection cap and a quiet log under load.

Every test drives a real uvicorn server on 127.0.0.1 (built by ``build_uvicorn_config``) with
httpx or raw sockets.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from http_helpers import (
    body_of,
    captured_log,
    config_for,
    configured_server,
    connect,
    read_until_closed,
    status_of,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chatstream.web.limits import BodyLimitMiddleware
from chatstream.web.server import (
    GuardedH11Protocol,
    RateLimitFilter,
    build_uvicorn_config,
    default_max_connections,
    fastapi_docs_kwargs,
    raise_fd_limit,
)

LIMIT = 4096


def make_app(guarded: bool = True, read_timeout_s: float = 0.5) -> tuple[Starlette, list[int]]:
    """An app that echoes the size of what it read; ``seen`` records every body that reached it."""
    seen: list[int] = []

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        seen.append(len(body))
        return JSONResponse({"received": len(body)})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[
        Route("/echo", echo, methods=["POST"]),
        Route("/v1/echo", echo, methods=["POST"]),
        Route("/health", health),
    ])
    if guarded:
        app.add_middleware(BodyLimitMiddleware, max_body_bytes=LIMIT, read_timeout_s=read_timeout_s)
    return app, seen


@pytest.fixture
def guarded() -> Iterator[tuple[str, int, list[int]]]:
    app, seen = make_app()
    with configured_server(config_for(app, header_timeout_s=0.5, keep_alive_s=5)) as server:
        yield server.url, server.port, seen


def raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


# -- body size -------------------------------------------------------------------------------

def test_bodies_within_the_limit_reach_the_app(guarded: tuple[str, int, list[int]]) -> None:
    url, _, seen = guarded
    assert httpx.post(url + "/echo", content=b"x" * LIMIT).json() == {"received": LIMIT}

    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"y" * (LIMIT // 4)

    assert httpx.post(url + "/echo", content=chunks()).json() == {"received": LIMIT}
    assert seen == [LIMIT, LIMIT]


def test_a_declared_length_over_the_limit_is_413_at_once_without_reading_the_body(
    guarded: tuple[str, int, list[int]]
) -> None:
    _, port, seen = guarded
    sock = raw(port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000000000000\r\n\r\n")
    started = time.monotonic()
    response = read_until_closed(sock)  # ends: the server closes the connection
    assert time.monotonic() - started < 5
    assert status_of(response) == 413
    assert b"connection: close" in response.lower()
    assert json.loads(body_of(response))["error"] == "request_too_large"
    assert seen == []


def test_a_body_over_the_limit_without_a_length_is_413_as_soon_as_it_passes(
    guarded: tuple[str, int, list[int]]
) -> None:
    _, port, seen = guarded
    sock = raw(port, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 1024
    for _ in range(LIMIT // 1024 + 1):  # one past the limit, then the client stops without ending the body
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    response = read_until_closed(sock)
    assert status_of(response) == 413
    assert json.loads(body_of(response)) == {
        "error": "request_too_large", "message": f"The request body is larger than {LIMIT} bytes."}
    assert seen == []


def test_under_v1_the_413_is_in_openai_shape(guarded: tuple[str, int, list[int]]) -> None:
    url, _, _ = guarded
    response = httpx.post(url + "/v1/echo", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.json() == {"error": {
        "message": f"The request body is larger than {LIMIT} bytes.", "type": "invalid_request_error",
        "param": None, "code": "request_too_large"}}


def test_without_the_middleware_a_declared_huge_length_just_waits() -> None:
    """The defect this guards against: the server waits for a body that never comes."""
    app, _ = make_app(guarded=False)
    with configured_server(config_for(app, header_timeout_s=None)) as server:
        sock = raw(server.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000000000\r\n\r\n")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(1)
        sock.close()


# -- body read time --------------------------------------------------------------------------

def test_a_stalled_body_is_408_and_the_connection_closed(guarded: tuple[str, int, list[int]]) -> None:
    _, port, seen = guarded
    sock = raw(port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    started = time.monotonic()
    response = read_until_closed(sock)
    assert 0.4 < time.monotonic() - started < 5
    assert status_of(response) == 408
    assert json.loads(body_of(response))["error"] == "request_timeout"
    assert seen == []


def test_a_client_that_leaves_mid_body_leaves_no_error_in_the_log() -> None:
    for guarded in (False, True):
        app, seen = make_app(guarded=guarded)
        # Built before capturing (uvicorn's logging setup drops the loggers' handlers), without
        # the log rate limit (an earlier test may have logged the same traceback).
        config = config_for(app, log_interval_s=0)
        with captured_log("uvicorn.error") as log, configured_server(config) as server:
            sock = raw(server.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            time.sleep(0.2)
            sock.close()
            deadline = time.monotonic() + 5
            while (server.open_connections or not guarded and not log.records) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
        errors = log.messages(logging.ERROR)
        if guarded:
            assert errors == [] and seen == []
        else:  # the defect: Starlette's ClientDisconnect surfaces as an ASGI traceback
            assert any("Exception in ASGI application" in m for m in errors)


# -- request-head timeout (slowloris) --------------------------------------------------------

def test_half_a_request_head_is_408_and_closed_after_the_header_timeout(guarded: tuple[str, int, list[int]]) -> None:
    _, port, _ = guarded
    sock = raw(port, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    started = time.monotonic()
    response = read_until_closed(sock)
    assert 0.4 < time.monotonic() - started < 5
    assert status_of(response) == 408


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    guarded: tuple[str, int, list[int]]
) -> None:
    _, port, _ = guarded
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert 0.4 < time.monotonic() - started < 5


def test_a_trickled_head_on_a_kept_alive_connection_is_cut_off_too(guarded: tuple[str, int, list[int]]) -> None:
    _, port, _ = guarded
    sock = raw(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += sock.recv(65536)
    assert status_of(first) == 200
    started = time.monotonic()
    for byte in b"GET /health HTTP/1.1\r\n":  # a byte every 0.1 s: each would reset a per-read idle timer
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    assert status_of(read_until_closed(sock)) == 408
    assert time.monotonic() - started < 5


def test_complete_requests_are_not_affected_by_the_header_timeout(guarded: tuple[str, int, list[int]]) -> None:
    url, _, _ = guarded
    with httpx.Client() as client:  # one kept-alive connection, idle longer than the header timeout
        assert client.get(url + "/health").status_code == 200
        time.sleep(0.8)
        assert client.get(url + "/health").status_code == 200
        assert client.post(url + "/echo", content=b"abc").json() == {"received": 3}


def test_without_the_guarded_protocol_half_a_head_waits_forever() -> None:
    app, _ = make_app()
    with configured_server(config_for(app, header_timeout_s=None)) as server:
        sock = raw(server.port, b"GET /health HTTP/1.1\r\nHost: t\r\n")
        sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            sock.recv(1)
        sock.close()


# -- connection cap and log volume -----------------------------------------------------------

def test_connections_past_the_cap_are_refused_at_once_and_logged_once() -> None:
    app, _ = make_app()
    config = config_for(app, max_connections=3, header_timeout_s=30, log_interval_s=60)
    with captured_log("uvicorn.error") as log, configured_server(config) as server:
        idle = [connect(server) for _ in range(3)]
        deadline = time.monotonic() + 5
        while server.open_connections < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = []
        for _ in range(20):
            sock = connect(server)
            started = time.monotonic()
            answer = read_until_closed(sock)
            assert time.monotonic() - started < 5
            assert answer == b"" or status_of(answer) == 503
            refused.append(answer)
            sock.close()
        assert any(refused)  # the 503 arrives (it may lose a race with the reset only rarely)
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 5
        while server.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(server.url + "/health").status_code == 200
    refusals = [m for m in log.messages() if "Refused a connection" in m]
    assert len(refusals) == 1


def test_the_rate_limit_filter_lets_one_line_through_per_kind_and_interval() -> None:
    target = logging.getLogger("chatstream.test.ratelimit")
    target.propagate = False
    target.addFilter(RateLimitFilter(interval_s=1.5))  # the 1000 lines below take far less, even on a busy machine
    with captured_log("chatstream.test.ratelimit") as log:
        for _ in range(1000):
            target.error("accept failed: %s", "EMFILE")
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                target.exception("Exception in callback <TimerHandle when=%d>\nmore", time.monotonic_ns())
        target.error("a different problem")
        time.sleep(1.55)
        target.error("accept failed: %s", "EMFILE")
    messages = log.messages()
    assert messages[:3] == [
        "accept failed: EMFILE",
        f"Exception in callback <TimerHandle when={log.records[1].args[0]}>\nmore",
        "a different problem",
    ]
    assert len(messages) == 4 and messages[3].startswith("accept failed: EMFILE [999 more like this in the last ")


def test_build_uvicorn_config_sets_the_limits() -> None:
    app, _ = make_app()
    config = build_uvicorn_config(app, port=0, keep_alive_s=3, header_timeout_s=7, max_connections=50,
                                  graceful_shutdown_s=4, log_level="warning")
    assert issubclass(config.http, GuardedH11Protocol)
    assert config.http.header_timeout_s == 7 and config.http.max_connections == 50
    assert config.timeout_keep_alive == 3
    assert config.limit_concurrency == 51
    assert config.backlog == 128
    assert config.timeout_graceful_shutdown == 4


def test_the_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft == hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(256, hard // 2), hard))
        limit = raise_fd_limit()
        now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert limit == now_soft
        if hard != resource.RLIM_INFINITY:
            assert now_soft == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))


def test_default_connection_cap_leaves_descriptors_to_spare() -> None:
    assert default_max_connections(1024) == 128
    assert default_max_connections(1024, backlog=16) == 352
    assert default_max_connections(20000) == 4096
    assert default_max_connections(256) == 16
    assert default_max_connections(None) == 1024


def test_fastapi_docs_are_off_unless_asked_for() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    off = TestClient(FastAPI(**fastapi_docs_kwargs()))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert off.get(path).status_code == 404
    assert TestClient(FastAPI(**fastapi_docs_kwargs(True))).get("/openapi.json").status_code == 200


_SERVER_WITH_FEW_FDS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from chatstream.web.server import build_uvicorn_config

async def health(request):
    return JSONResponse({"status": "ok"})

app = Starlette(routes=[Route("/health", health)])
cap = int(sys.argv[2]) if sys.argv[2] != "default" else None
config = build_uvicorn_config(app, port=int(sys.argv[1]), header_timeout_s=1.0, max_connections=cap, log_level="info")
print("max_connections", config.http.max_connections, flush=True)
uvicorn.Server(config).run()
"""


@pytest.mark.parametrize("cap", ["default", "5000"])
def test_a_flood_of_idle_connections_neither_stops_the_server_nor_floods_the_log(tmp_path: Any, cap: str) -> None:
    """The defect: with 1,024 descriptors, 1,100 idle connections stopped the server for good and
    logged megabytes a second. With the default cap descriptors never run out; with a cap set above
    the descriptor limit they do, and the rate-limited log and the header timeout still hold."""
    import os
    import subprocess
    import sys

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", _SERVER_WITH_FEW_FDS, str(port), cap],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/health"
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()
                time.sleep(0.1)
        for _ in range(1100):  # more than the process has descriptors
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # The excess is refused at once, the idle ones are closed after the header timeout,
        # and then the server answers again.
        deadline = time.monotonic() + 15
        status = None
        while status != 200 and time.monotonic() < deadline:
            try:
                status = httpx.get(url, timeout=2).status_code
            except httpx.TransportError:
                status = None
            time.sleep(0.2)
        assert status == 200
        assert process.poll() is None
    finally:
        for sock in idle:
            sock.close()
        process.terminate()
        process.wait(timeout=15)
    log = log_path.read_text()
    if cap == "default":
        assert "max_connections 128" in log
        assert "out of system resource" not in log
        assert log.count("Refused a connection") <= 3
    else:
        assert log.count("out of system resource") <= 3  # when descriptors ran out: one line per interval
    assert len(log) < 50_000
