"""The uvicorn configuration of ``chatstream serve``: timeouts, a connection cap and a quiet log under load.

uvicorn by itself has no timeout for a request head (a client that connects and sends nothing,
or half a header, holds its connection forever: slowloris), accepts connections until the
process runs out of file descriptors, and logs one line per refused request. Here:

- :class:`GuardedH11Protocol` (uvicorn's h11 protocol, set through ``Config(http=...)``) closes a
  connection whose request head is not complete ``header_timeout_s`` after it opened (or after
  the first byte of a keep-alive request), and refuses connections past ``max_connections`` at
  once with a 503, so file descriptors never run out; after a stall of the process longer than a
  timeout (keep-alive, request head), it reads what arrived meanwhile before it closes anything, so
  a request sent during the stall is answered rather than dropped;
- :func:`raise_fd_limit` lifts ``RLIMIT_NOFILE``'s soft limit to the hard one, and
  :func:`default_max_connections` derives the cap from it;
- :class:`RateLimitFilter` lets one line through per kind of message and interval, counting the rest.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_GRACEFUL_SHUTDOWN_S = 10
DEFAULT_LOG_INTERVAL_S = 10.0
DEFAULT_BACKLOG = 128  # also the most connections asyncio accepts per loop iteration

# A timeout that finds bytes the loop has not read yet (its process stalled: stopped, swapped out,
# its loop blocked) looks again this much later, once they are read, rather than drop a request.
_RECHECK_S = 0.2
_FD_RESERVE = 256  # model files, the session database, logs, pipes, the listening sockets
_MAX_DEFAULT_CONNECTIONS = 4096

_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 15\r\nconnection: close\r\n\r\nRequest Timeout"
)
_SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 19\r\nretry-after: 1\r\nconnection: close\r\n\r\nService Unavailable"
)

logger = logging.getLogger("uvicorn.error")


# -- file descriptors ---------------------------------------------------------------------------

def raise_fd_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now in force.

    ``None`` where the platform has no such limit (Windows).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS caps the soft limit below an infinite hard one
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def default_max_connections(fd_limit: int | None, backlog: int = DEFAULT_BACKLOG) -> int:
    """Connections one process may hold: half the descriptors left after reserves, at most 4096.

    Half, because a request proxied to a remote engine holds a second descriptor upstream.
    Reserved: descriptors for files and pipes, and four accept batches of ``backlog`` sockets,
    which asyncio accepts in one go per loop iteration and a refused one keeps for a few
    iterations before it is closed.
    """
    if fd_limit is None:
        return 1024
    return max(16, min(_MAX_DEFAULT_CONNECTIONS, (fd_limit - _FD_RESERVE - 4 * backlog) // 2))


# -- the protocol -------------------------------------------------------------------------------

class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and a cap on open connections.

    Configure a subclass with :meth:`configured`; uvicorn builds one instance per connection.
    """

    header_timeout_s: float | None = DEFAULT_HEADER_TIMEOUT_S
    max_connections: int | None = None

    @classmethod
    def configured(cls, header_timeout_s: float | None, max_connections: int | None) -> type[GuardedH11Protocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            logger.warning("Refused a connection: %d connections are open (max_connections).", self.max_connections)
            transport.write(_SERVICE_UNAVAILABLE)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._awaiting_head():
            self._arm_head_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if not self._awaiting_head():
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle between requests is the keep-alive timeout's business, unless a pipelined head is half here.
        if self._awaiting_head() and self.conn.trailing_data[0]:
            self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _arm_head_timer(self) -> None:
        if self.header_timeout_s is not None and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def timeout_keep_alive_handler(self) -> None:
        if self._unread_bytes():  # a request arrived while the process stalled: data_received cancels this
            self.timeout_keep_alive_task = self.loop.call_later(_RECHECK_S, self.timeout_keep_alive_handler)
            return
        super().timeout_keep_alive_handler()

    def _unread_bytes(self) -> int:
        """Bytes the kernel holds for this connection that the event loop has not read yet."""
        try:
            import fcntl
            import termios

            sock = self.transport.get_extra_info("socket")
            return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
        except (ImportError, OSError, AttributeError, ValueError):  # not POSIX, or the socket is gone
            return 0

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._unread_bytes():
            self._head_timer = self.loop.call_later(_RECHECK_S, self._head_timed_out)
            return
        if not self._awaiting_head():
            return
        if self.conn.trailing_data[0]:  # half a request: say why; a silent connection is just closed
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


# -- logging ------------------------------------------------------------------------------------

class RateLimitFilter(logging.Filter):
    """Let through one record per kind of message per ``interval_s``; the next one says how many were dropped.

    A kind is the logger, the message template's first line and the exception's type and text, so a flood of
    one failure (every refused connection, every ``EMFILE``) is one line per interval while
    distinct errors still show.
    """

    def __init__(self, interval_s: float = DEFAULT_LOG_INTERVAL_S, max_kinds: int = 1000) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.max_kinds = max_kinds
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # First line only: asyncio's messages go on with reprs that differ every time (timer deadlines).
        kind = (record.name, str(record.msg).partition("\n")[0][:200], f"{type(exc).__name__}: {exc}"[:200] if exc else "")
        now = time.monotonic()
        last, dropped = self._seen.get(kind, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._seen[kind] = (last, dropped + 1)
            return False
        if len(self._seen) >= self.max_kinds:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {now - last:.1f} s]"
        return True


def install_log_rate_limit(
    interval_s: float = DEFAULT_LOG_INTERVAL_S, loggers: tuple[str, ...] = ("uvicorn.error", "asyncio")
) -> None:
    """Put one :class:`RateLimitFilter` on each of ``loggers`` (once; a second call updates the interval)."""
    for name in loggers:
        target = logging.getLogger(name)
        existing = [f for f in target.filters if isinstance(f, RateLimitFilter)]
        if existing:
            existing[0].interval_s = interval_s
        else:
            target.addFilter(RateLimitFilter(interval_s))


# -- the config ---------------------------------------------------------------------------------

def build_uvicorn_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
    header_timeout_s: float | None = DEFAULT_HEADER_TIMEOUT_S,
    max_connections: int | None = None,
    backlog: int | None = None,
    graceful_shutdown_s: int | None = DEFAULT_GRACEFUL_SHUTDOWN_S,
    log_interval_s: float = DEFAULT_LOG_INTERVAL_S,
    **uvicorn_kwargs: Any,
) -> uvicorn.Config:
    """The ``uvicorn.Config`` for chatstream; raises the file-descriptor limit as a side effect.

    ``max_connections`` defaults to :func:`default_max_connections` of the raised limit. Other
    keyword arguments go to ``uvicorn.Config`` unchanged (``log_level``, ``forwarded_allow_ips``,
    ``ssl_*``, ...).
    """
    fd_limit = raise_fd_limit()
    backlog = DEFAULT_BACKLOG if backlog is None else backlog
    if max_connections is None:
        max_connections = default_max_connections(fd_limit, backlog)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=GuardedH11Protocol.configured(header_timeout_s, max_connections),
        timeout_keep_alive=keep_alive_s,  # type: ignore[arg-type]  # uvicorn schedules it with call_later
        # Connections are capped at accept; this caps requests still running after their client left.
        limit_concurrency=max_connections + 1,
        backlog=backlog,
        timeout_graceful_shutdown=graceful_shutdown_s,
        **uvicorn_kwargs,
    )
    install_log_rate_limit(log_interval_s)
    return config


def fastapi_docs_kwargs(enabled: bool = False) -> dict[str, Any]:
    """``FastAPI(**fastapi_docs_kwargs(settings.docs))``: no ``/docs``, ``/redoc`` or ``/openapi.json`` unless asked."""
    if enabled:
        return {}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}
