"""Helpers for the HTTP-guard tests: a real uvicorn server built from a given Config, raw sockets, log capture."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


class ConfiguredServer:
    """A real uvicorn server on 127.0.0.1 run from a ready ``uvicorn.Config``, in a background thread."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> ConfiguredServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

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
def configured_server(config: uvicorn.Config) -> Iterator[ConfiguredServer]:
    server = ConfiguredServer(config).start()
    try:
        yield server
    finally:
        server.stop()


def connect(server: ConfiguredServer, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return sock


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


class CapturedLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@contextlib.contextmanager
def captured_log(*names: str) -> Iterator[CapturedLog]:
    handler = CapturedLog()
    loggers = [logging.getLogger(name) for name in names]
    for target in loggers:
        target.addHandler(handler)
    try:
        yield handler
    finally:
        for target in loggers:
            target.removeHandler(handler)


def config_for(app: Any, **kwargs: Any) -> uvicorn.Config:
    from chatstream.web.server import build_uvicorn_config

    kwargs.setdefault("log_level", "warning")
    return build_uvicorn_config(app, host="127.0.0.1", port=0, **kwargs)
