"""The sign-in flow in a real browser: the chat UI behind AuthMiddleware and OriginCheckMiddleware.

Headless Chromium (the Debian package, as in test_ui.py) drives a mock-model server on 127.0.0.1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from http_helpers import config_for, configured_server

from chatstream.settings import Settings
from chatstream.web.app import create_app
from chatstream.web.auth import AuthMiddleware
from chatstream.web.limits import BodyLimitMiddleware
from chatstream.web.origin import OriginCheckMiddleware

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "browser-test-key-0123456789"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run `make browser`")
expect.set_options(timeout=10_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def url() -> Iterator[str]:
    app: Any = create_app(Settings(mock=True, mock_token_delay=0.01, session_secret="login-tests-" + "x" * 32))
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(AuthMiddleware, api_key=KEY)
    app.add_middleware(OriginCheckMiddleware)
    with configured_server(config_for(app)) as server:
        yield server.url


def test_sign_in_chat_and_be_sent_back_to_sign_in_when_signed_out(browser: Browser, url: str) -> None:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and "401" not in message.text
            and errors.append(message.text))
    try:
        page.goto(url + "/")
        expect(page).to_have_url(url + "/login")

        page.locator("#key").fill("wrong")
        page.locator("#key").press("Enter")
        expect(page.locator("#error")).to_have_text("That key is not right.")

        page.locator("#key").fill(KEY)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(url + "/")
        expect(page.locator("#model-name")).to_have_text("mock")

        # A chat turn: a cookie-carrying POST with the browser's own Origin passes the origin check.
        page.locator("#input").fill("Hello")
        page.locator("#input").press("Enter")
        expect(page.locator(".msg-assistant .content")).not_to_be_empty()
        expect(page.get_by_role("button", name="Send")).to_be_visible()

        # Signed out (the cookie is gone): the next request sends the page to the login page.
        context.clear_cookies()
        page.get_by_role("button", name="New chat").click()
        expect(page).to_have_url(url + "/login")
    finally:
        context.close()
    assert not errors, errors
