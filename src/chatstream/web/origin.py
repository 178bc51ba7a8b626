"""CSRF defence for cookie-carrying requests: a state-changing request must come from our own origin.

Browsers attach cookies (the session, the sign-in) to requests that other sites make them send.
Those requests carry an ``Origin`` header (or at least a ``Referer``), so a POST, PUT, PATCH or
DELETE that carries cookies is refused with 403 when either header names another origin than the
request's own (scheme, host and port, from the ``Host`` header) or one of ``allowed_origins``.

Exempt: requests without cookies (nothing ambient to abuse), requests with neither header (not a
browser), and requests with ``Authorization: Bearer`` (a browser sends that header cross-site only
after a CORS preflight that this server does not grant; a wrong key is refused by the auth check).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .http_errors import json_error

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


def parse_origin(value: str) -> Origin | None:
    """``(scheme, host, port)`` of an origin or URL, with the scheme's default port filled in; None if unusable."""
    try:
        parts = urlsplit(value.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def request_origin(scope: Scope) -> Origin | None:
    """The origin the request was addressed to: its scheme and its ``Host`` header."""
    host = Headers(scope=scope).get("host")
    if not host:
        return None
    return parse_origin(f"{scope.get('scheme', 'http')}://{host}")


class OriginCheckMiddleware:
    """Pure ASGI middleware: 403 ``forbidden_origin`` for cross-origin, cookie-carrying unsafe requests."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed: set[Origin] = set()
        for value in allowed_origins:
            origin = parse_origin(value)
            if origin is None:
                raise ValueError(f"not an origin: {value!r} (expected e.g. 'https://chat.example.com')")
            self.allowed.add(origin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS and not self._origin_ok(scope):
            response = json_error(scope, 403, "forbidden_origin",
                                  "Cross-origin request refused: the Origin of this request is not allowed.")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _origin_ok(self, scope: Scope) -> bool:
        headers = Headers(scope=scope)
        if "cookie" not in headers or headers.get("authorization", "")[:7].lower() == "bearer ":
            return True
        claimed = headers.get("origin") or headers.get("referer")
        if claimed is None:
            return True
        origin = parse_origin(claimed)  # "null" (sandboxed frames, privacy redirects) parses as None
        return origin is not None and (origin == request_origin(scope) or origin in self.allowed)
