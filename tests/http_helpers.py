"""Helpers for the HTTP-guard tests: a real uvicorn server built from a given Config, raw sockets, log capture."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from conftest import LiveServer

ConfiguredServer = LiveServer  # a LiveServer run from a ready uvicorn.Config


@contextlib.contextmanager
def configured_server(config: uvicorn.Config) -> Iterator[ConfiguredServer]:
    server = LiveServer(config=config).start()
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
