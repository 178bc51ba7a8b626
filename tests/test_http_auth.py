"""One API key protects every route; browsers sign in on a login page; cross-origin cookie requests are refused.

Every test drives a real uvicorn server on 127.0.0.1 with httpx.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from http_helpers import config_for, configured_server
from itsdangerous import TimestampSigner

from chatstream.web.auth import AuthMiddleware
from chatstream.web.json_body import BadJSON, parse_json_body, require_json
from chatstream.web.limits import BodyLimitMiddleware
from chatstream.web.origin import OriginCheckMiddleware
from chatstream.web.server import fastapi_docs_kwargs

KEY = "s3cret-key-0123456789"
PROTECTED = [("GET", "/"), ("GET", "/history"), ("POST", "/chat_stream"), ("POST", "/clear_context"),
             ("GET", "/stats/loop_lag"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
             ("GET", "/static/chat.js"), ("GET", "/docs"), ("GET", "/no/such/route")]


def make_app(**auth: Any) -> FastAPI:
    """Stand-ins for chatstream's routes behind the guards, in the order the server wires them."""
    app = FastAPI(**fastapi_docs_kwargs())

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse("<!doctype html><title>chat</title>")

    @app.post("/chat_stream")
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        refusal = require_json(request)
        if refusal is not None:
            return refusal
        try:
            data = parse_json_body(await request.body())
        except BadJSON as exc:
            return JSONResponse({"error": "bad_request", "message": str(exc)}, status_code=400)
        return {"ok": True, "echo": data}

    for path in ("/history", "/stats/loop_lag", "/v1/models", "/static/chat.js"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET"])
    app.add_api_route("/clear_context", lambda: {"ok": True}, methods=["POST"])
    app.add_api_route("/health", lambda: {"status": "ok"}, methods=["GET"])

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=64 * 1024, read_timeout_s=5)
    if auth.get("api_key", KEY) is not None:
        app.add_middleware(AuthMiddleware, **{"api_key": KEY, **auth})
    app.add_middleware(OriginCheckMiddleware, allowed_origins=["https://chat.example.com"])
    return app


@pytest.fixture
def server() -> Iterator[str]:
    with configured_server(config_for(make_app(max_failures=3, failure_window_s=60))) as live:
        yield live.url


def sign_in(url: str, key: str = KEY, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + "/login", data={"key": key}, **kwargs)


def auth_cookie(response: httpx.Response) -> str:
    set_cookie = response.headers["set-cookie"]
    return set_cookie.split(";")[0]


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", PROTECTED)
def test_every_route_needs_the_key(server: str, method: str, path: str) -> None:
    response = httpx.request(method, server + path, json={"user_input": "hi"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    if path.startswith("/v1"):
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.json()["error"]["type"] == "invalid_request_error"
    else:
        assert response.json()["error"] == "unauthorized"


def test_health_stays_open_for_load_balancers(server: str) -> None:
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_a_browser_is_sent_to_the_login_page(server: str) -> None:
    response = httpx.get(server + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert response.status_code == 303
    assert response.headers["location"] == "/login"


def test_the_right_bearer_key_opens_every_route_and_a_wrong_one_none(server: str) -> None:
    for method, path in PROTECTED[:7]:
        ok = httpx.request(method, server + path, json={"user_input": "hi"}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, path
        wrong = httpx.request(method, server + path, json={}, headers={"Authorization": f"Bearer {KEY}x"})
        assert wrong.status_code == 401, path
        assert "Incorrect" in wrong.text


def test_docs_and_openapi_schema_are_off(server: str) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


# -- the login page --------------------------------------------------------------------------

class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_the_login_page_and_its_assets_are_open_and_follow_the_csp(server: str) -> None:
    page = httpx.get(server + "/login")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp and "'unsafe-inline'" not in csp
    parser = _Tags()
    parser.feed(page.text)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts and all(attrs.get("src") for attrs in scripts)  # no inline script
    assert not any(name.startswith("on") for _, attrs in parser.tags for name in attrs)
    assert not any(tag == "style" for tag, _ in parser.tags) and not any("style" in attrs for _, attrs in parser.tags)
    for tag, attrs in parser.tags:
        for name in ("src", "href"):
            url = attrs.get(name)
            if url and tag in ("script", "link"):
                asset = httpx.get(server + "/" + url)
                assert asset.status_code == 200, url
                assert asset.headers["x-content-type-options"] == "nosniff"
    form = next(attrs for tag, attrs in parser.tags if tag == "form")
    assert form["method"] == "post" and form["action"] == "login"
    assert any(tag == "input" and attrs.get("name") == "key" for tag, attrs in parser.tags)


def test_signing_in_sets_a_strict_httponly_cookie_that_opens_every_route(server: str) -> None:
    response = sign_in(server)
    assert response.status_code == 303 and response.headers["location"] == "/"
    set_cookie = response.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=604800"):
        assert attribute in set_cookie
    assert "Secure" not in set_cookie
    cookie = {"Cookie": auth_cookie(response)}
    for method, path in PROTECTED[:7]:
        assert httpx.request(method, server + path, json={"user_input": "hi"}, headers=cookie).status_code == 200, path
    assert httpx.get(server + "/login", headers=cookie).headers["location"] == "/"  # already signed in


def test_json_sign_in_and_a_wrong_key(server: str) -> None:
    assert httpx.post(server + "/login", json={"key": KEY}).status_code == 303
    wrong = sign_in(server, "nope")
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert httpx.post(server + "/login", content=b"key=" + KEY.encode(), headers={"Content-Type": "text/plain"}).status_code == 400


def test_a_tampered_or_expired_or_foreign_cookie_opens_nothing() -> None:
    class Past(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 8 * 24 * 3600

    expired = "chatstream_auth=" + Past(KEY, salt="chatstream.auth").sign(b"chatstream").decode()
    with configured_server(config_for(make_app())) as one, \
            configured_server(config_for(make_app(api_key="another-key"))) as other:
        good = auth_cookie(sign_in(one.url))
        name, _, value = good.partition("=")
        tampered = f"{name}={value[:-2]}{'A' if value[-2] != 'A' else 'B'}{value[-1]}"
        for cookie in (tampered, expired, f"{name}=chatstream"):
            assert httpx.get(one.url + "/history", headers={"Cookie": cookie}).status_code == 401, cookie
        # the same cookie on a server with another key: changing the key signs everybody out
        assert httpx.get(one.url + "/history", headers={"Cookie": good}).status_code == 200
        assert httpx.get(other.url + "/history", headers={"Cookie": good}).status_code == 401
        # a wrong bearer key never falls back to a valid cookie
        assert httpx.get(one.url + "/history", headers={"Cookie": good, "Authorization": "Bearer x"}).status_code == 401


def test_secure_cookies_option() -> None:
    with configured_server(config_for(make_app(secure_cookies=True, max_age_s=3600))) as live:
        set_cookie = sign_in(live.url).headers["set-cookie"]
    assert "Secure" in set_cookie and "Max-Age=3600" in set_cookie


def test_logout_clears_the_cookie(server: str) -> None:
    response = httpx.post(server + "/logout", headers={"Cookie": auth_cookie(sign_in(server)), "Origin": server})
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert "chatstream_auth=;" in response.headers["set-cookie"] and "Max-Age=0" in response.headers["set-cookie"]


def test_repeated_wrong_keys_from_one_address_are_throttled(server: str) -> None:
    for _ in range(3):
        assert sign_in(server, "guess").status_code == 401
    throttled = sign_in(server)  # even the right key, once throttled
    assert throttled.status_code == 429
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    assert throttled.json()["error"] == "too_many_login_attempts"
    # another client address is not affected
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as elsewhere:
        assert elsewhere.post(server + "/login", data={"key": KEY}).status_code == 303
    # bearer clients are not affected either
    assert httpx.get(server + "/history", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# -- cross-origin requests with cookies ------------------------------------------------------

def test_cross_origin_cookie_requests_are_forbidden(server: str) -> None:
    cookie = auth_cookie(sign_in(server))
    port = server.rsplit(":", 1)[1]

    def post(**headers: str) -> httpx.Response:
        return httpx.post(server + "/chat_stream", json={"user_input": "hi"}, headers={"Cookie": cookie, **headers})

    for origin in ("http://evil.example", "null", f"https://127.0.0.1:{port}", "http://127.0.0.1:1"):
        refused = post(Origin=origin)
        assert refused.status_code == 403, origin
        assert refused.json()["error"] == "forbidden_origin"
    assert post(Referer="http://evil.example/page").status_code == 403
    assert post(Origin=server).status_code == 200
    assert post(Origin=f"http://localhost:{port}", Host=f"localhost:{port}").status_code == 200
    assert post(Referer=server + "/").status_code == 200
    assert post(Origin="https://chat.example.com").status_code == 200  # the allow-list
    assert post().status_code == 200  # no Origin, no Referer: not a browser
    assert httpx.get(server + "/history", headers={"Cookie": cookie, "Origin": "http://evil.example"}).status_code == 200
    bearer = httpx.post(server + "/chat_stream", json={"user_input": "hi"},
                        headers={"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"})
    assert bearer.status_code == 200


def test_the_origin_check_works_without_auth_and_spares_cookieless_requests() -> None:
    with configured_server(config_for(make_app(api_key=None))) as live:
        url = live.url + "/chat_stream"
        session = {"Cookie": "chatstream_session=abc"}
        assert httpx.post(url, json={}, headers={**session, "Origin": "http://evil.example"}).status_code == 403
        assert httpx.post(url, json={}, headers={"Origin": "http://evil.example"}).status_code == 200


# -- content type ----------------------------------------------------------------------------

def test_chat_bodies_must_be_json(server: str) -> None:
    bearer = {"Authorization": f"Bearer {KEY}"}
    body = b'{"user_input": "hi"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/json; charset=latin-1"):
        refused = httpx.post(server + "/chat_stream", content=body, headers={**bearer, "Content-Type": content_type})
        assert refused.status_code == 415, content_type
        assert refused.json()["error"] == "unsupported_media_type"
    openai = httpx.post(server + "/v1/chat/completions", content=body, headers={**bearer, "Content-Type": "text/plain"})
    assert openai.status_code == 415 and openai.json()["error"]["code"] == "unsupported_media_type"
    for headers in ({"Content-Type": "application/json"}, {"Content-Type": "application/json; charset=utf-8"}, {}):
        accepted = httpx.post(server + "/chat_stream", content=body, headers={**bearer, **headers})
        assert accepted.status_code == 200 and accepted.json()["echo"] == {"user_input": "hi"}


def test_bad_json_is_a_400_never_a_500(server: str) -> None:
    bearer = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"[" * 5000 + b"]" * 5000, b'{"user_input": "\\ud800"}', b"1" * 5000, b"NaN", b"\xff"):
        response = httpx.post(server + "/chat_stream", content=body, headers=bearer)
        assert response.status_code == 400, body[:20]
        assert response.json()["error"] == "bad_request"
