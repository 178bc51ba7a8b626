"""Shared fixtures: real servers (uvicorn on a loopback port) and the real default model."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn

# Servers started by the tests (in process or as `chatstream serve`) keep their sessions database
# and secret here, never in the developer's own data folder.
os.environ["CHATSTREAM_DATA_DIR"] = tempfile.mkdtemp(prefix="chatstream-test-data-")


class LiveServer:
    """A real uvicorn server in a background thread, for real HTTP clients and real disconnects."""

    def __init__(self, app: Any = None, *, config: uvicorn.Config | None = None) -> None:
        """Serve ``app`` on a free loopback port, or run a ready ``config`` (the guards' tests)."""
        self.app = app if config is None else config.app
        self._server = uvicorn.Server(
            config or uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._server.server_state.connections)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[LiveServer]:
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def serve() -> Iterator[Callable[[Any], LiveServer]]:
    """``serve(app)`` starts a real server for the test; all are stopped afterwards."""
    servers: list[LiveServer] = []

    def start(app: Any) -> LiveServer:
        server = LiveServer(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def _loaded_default_model() -> tuple[Any, Any]:
    from chatstream import load_model

    # float32 (its GGUF converted once): the engine's exact-replay tests (batching, preemption,
    # prefix caching change no token) hold for float activations; the GGUF blocks, whose int8
    # activations can flip a near tie, have their own tests (test_quant_model.py).
    return load_model(quantized=False)


@pytest.fixture(scope="module")
def default_model(_loaded_default_model: tuple[Any, Any]) -> tuple[Any, Any]:
    """The embedded default model, loaded once per test session, a fresh copy for each test module.

    An engine adapts the model it is given in place (its attention, int8 layers) until it shuts
    down; a copy per module keeps one module's engines from changing what another one runs.
    """
    import copy

    model, tokenizer = _loaded_default_model
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` on a free loopback port, for the whole test session; yields its URL.

    Missing redis-server is a failure, not a skip: the Redis store must be tested (``make test``
    installs it).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make redis` (apt-get install redis-server)", pytrace=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        if not wait_until(lambda: process.poll() is not None or _redis_pings(port), timeout=10) or process.poll() is not None:
            output = log.read_text(errors="replace")[-2000:]
            pytest.fail(f"redis-server did not start on port {port}:\n{output}", pytrace=False)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """Parse a whole SSE body into ``(event, data)`` pairs."""
    import json

    events = []
    for block in text.strip().split("\n\n"):
        event, data = "message", None
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:].strip())
        if data is not None:
            events.append((event, data))
    return events


CHROMIUM = "/usr/bin/chromium"  # the Debian package (`make browser`); Playwright never downloads one
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright. Missing Chromium is a failure, not a skip."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
