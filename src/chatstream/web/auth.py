"""One API key for every route: ``Authorization: Bearer <key>`` for programs, a login page for browsers.

:class:`AuthMiddleware` stands in front of the whole app. A request passes with the right
bearer key (compared in constant time) or with the signed cookie that ``POST /login`` sets
after the key was typed into the login page. Open without either: ``/health`` and ``/health/live``
(load balancers and liveness probes carry no key), the login page and its assets, ``/login`` and
``/logout``.

Refusals: a browser navigating to a page is redirected to the login page; anything else gets
401 JSON with ``WWW-Authenticate: Bearer`` (OpenAI's error shape under ``/v1``). Wrong keys
sent to ``/login`` are counted per client address: past ``max_failures`` in ``failure_window_s``
the answer is 429 with ``Retry-After``, right key or not.

The cookie is signed with itsdangerous using the key itself as the secret: whoever can forge
it already knows the key, cookies survive restarts and work across processes, and changing
the key signs everybody out.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from urllib.parse import parse_qs

from itsdangerous import BadSignature, TimestampSigner
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, cookie_parser
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .http_errors import is_openai_path, json_error
from .json_body import BadJSON, is_json_media_type, parse_json_body
from .limits import BodyTimeout, BodyTooLarge, read_body
from .ui import SECURITY_HEADERS, STATIC_DIR

LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
# Served by the middleware itself, so the login page works whatever the app mounts.
LOGIN_ASSETS = {
    "/static/login.js": ("login.js", "text/javascript; charset=utf-8"),
    "/static/login.css": ("login.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
_MAX_LOGIN_BODY = 4096
_SIGNED_PAYLOAD = b"chatstream"


def app_path(scope: Scope) -> str:
    """The path inside the app, without the ``root_path`` it is mounted under."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def bearer_token(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer`` header (possibly empty); None without one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class LoginThrottle:
    """Failed logins per client address in a sliding window; bounded in memory (oldest addresses go first)."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, max_clients: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again; 0 when it may now."""
        failures = self._failures.get(client)
        if failures is None:
            return 0
        now = time.monotonic()
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0
        if len(failures) < self.max_failures:
            return 0
        return max(1, int(self.window_s - (now - failures[0]) + 0.999))

    def failed(self, client: str) -> None:
        failures = self._failures.pop(client, None) or deque(maxlen=self.max_failures)
        failures.append(time.monotonic())
        self._failures[client] = failures  # most recent last
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


class AuthMiddleware:
    """Pure ASGI middleware: every route but ``open_paths``, the login page and its assets needs the key."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        *,
        open_paths: Iterable[str] = ("/health", "/health/live"),
        cookie_name: str = "chatstream_auth",
        max_age_s: int = 7 * 24 * 3600,
        secure_cookies: bool = False,
        max_failures: int = 5,
        failure_window_s: float = 300.0,
        login_timeout_s: float = 10.0,
    ) -> None:
        if not api_key:
            raise ValueError("AuthMiddleware needs a non-empty api_key")
        self.app = app
        self.key = api_key.encode()
        self.open_paths = frozenset(open_paths)
        self.cookie_name = cookie_name
        self.max_age_s = max_age_s
        self.secure_cookies = secure_cookies
        self.login_timeout_s = login_timeout_s
        self.throttle = LoginThrottle(max_failures, failure_window_s)
        self.signer = TimestampSigner(api_key, salt="chatstream.auth")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = app_path(scope)
        if scope["type"] == "http":
            own = await self._own_route(path, scope, receive)
            if own is not None:
                await own(scope, receive, send)
                return
        if path in self.open_paths or self._authorized(Headers(scope=scope)) is True:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self._refusal(scope, path)(scope, receive, send)

    # -- who is asking --

    def _authorized(self, headers: Headers) -> bool | None:
        """True with the right bearer key or cookie; False with a wrong bearer key; None with neither."""
        token = bearer_token(headers)
        if token is not None:  # decisive: a wrong bearer key never falls back to the cookie
            return hmac.compare_digest(token.encode(), self.key)
        return self._cookie_valid(headers) or None

    def _cookie_valid(self, headers: Headers) -> bool:
        value = cookie_parser(headers.get("cookie", "")).get(self.cookie_name)
        if not value:
            return False
        try:
            return self.signer.unsign(value, max_age=self.max_age_s) == _SIGNED_PAYLOAD
        except BadSignature:
            return False

    def _refusal(self, scope: Scope, path: str) -> Response:
        headers = Headers(scope=scope)
        if scope["method"] in ("GET", "HEAD") and "text/html" in headers.get("accept", "") and not is_openai_path(scope):
            return RedirectResponse(scope.get("root_path", "") + LOGIN_PATH, status_code=303)
        wrong = self._authorized(headers) is False
        message = ("Incorrect API key provided." if wrong
                   else "Authentication required: send 'Authorization: Bearer <key>' or sign in at /login.")
        code = "invalid_api_key" if is_openai_path(scope) else "unauthorized"
        return json_error(scope, 401, code, message, headers={"WWW-Authenticate": "Bearer"})

    # -- the login page, /login and /logout --

    async def _own_route(self, path: str, scope: Scope, receive: Receive) -> Response | None:
        method = scope["method"]
        if path in LOGIN_ASSETS and method in ("GET", "HEAD"):
            name, media_type = LOGIN_ASSETS[path]
            return FileResponse(STATIC_DIR / name, media_type=media_type,
                                headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
        if path == LOGIN_PATH and method in ("GET", "HEAD"):
            if self._cookie_valid(Headers(scope=scope)):
                return RedirectResponse(scope.get("root_path", "") + "/", status_code=303)
            return FileResponse(STATIC_DIR / "login.html", media_type="text/html; charset=utf-8",
                                headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})
        if path == LOGIN_PATH and method == "POST":
            return await self._login(scope, receive)
        if path == LOGOUT_PATH and method == "POST":
            response = RedirectResponse(scope.get("root_path", "") + LOGIN_PATH, status_code=303)
            response.headers.append("Set-Cookie", self._cookie(scope, "", max_age_s=0))
            return response
        if path in (LOGIN_PATH, LOGOUT_PATH):
            allowed = "GET, HEAD, POST" if path == LOGIN_PATH else "POST"
            return json_error(scope, 405, "method_not_allowed", "Method not allowed.", headers={"Allow": allowed})
        return None

    async def _login(self, scope: Scope, receive: Receive) -> Response:
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.retry_after(client)
        if wait:
            return json_error(scope, 429, "too_many_login_attempts",
                              f"Too many wrong keys from this address: try again in {wait} s.",
                              headers={"Retry-After": str(wait), "Connection": "close"})
        content_type = Headers(scope=scope).get("content-type", "")
        try:
            body = await read_body(receive, _MAX_LOGIN_BODY, self.login_timeout_s)
        except (BodyTooLarge, BodyTimeout, ClientDisconnect):
            return json_error(scope, 400, "bad_request", "The login request could not be read.",
                              headers={"Connection": "close"})
        key = _submitted_key(content_type, body)
        if key is None:
            return json_error(scope, 400, "bad_request",
                              "Send the key as form field 'key' or as JSON {\"key\": \"...\"}.")
        if not hmac.compare_digest(key.encode(), self.key):
            self.throttle.failed(client)
            return json_error(scope, 401, "unauthorized", "Incorrect key.")
        self.throttle.succeeded(client)
        response = RedirectResponse(scope.get("root_path", "") + "/", status_code=303)
        response.headers.append("Set-Cookie", self._cookie(scope, self.signer.sign(_SIGNED_PAYLOAD).decode()))
        return response

    def _cookie(self, scope: Scope, value: str, max_age_s: int | None = None) -> str:
        parts = [
            f"{self.cookie_name}={value}",
            f"Path={scope.get('root_path', '') or '/'}",
            f"Max-Age={self.max_age_s if max_age_s is None else max_age_s}",
            "HttpOnly",
            "SameSite=Strict",
        ]
        if self.secure_cookies:
            parts.append("Secure")
        return "; ".join(parts)


def _submitted_key(content_type: str, body: bytes) -> str | None:
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        try:
            values = parse_qs(body.decode("utf-8"), strict_parsing=False).get("key")
        except UnicodeDecodeError:
            return None
        return values[0] if values else None
    if is_json_media_type(content_type):
        try:
            data = parse_json_body(body)
        except BadJSON:
            return None
        key = data.get("key") if isinstance(data, dict) else None
        return key if isinstance(key, str) else None
    return None
