"""The sign-in flow in a real browser: the chat UI behind AuthMiddleware and OriginCheckMiddleware.

Headless Chromium (the Debian package, as in test_ui.py) drives a mock-model server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from http_helpers import config_for, configured_server
from playwright.sync_api import Browser, expect

from chatstream.settings import Settings
from chatstream.web.app import create_app

KEY = "browser-test-key-0123456789"

expect.set_options(timeout=10_000)


@pytest.fixture
def url() -> Iterator[str]:
    # The app chatstream serve runs: with an API key it installs the sign-in and origin guards itself.
    app = create_app(Settings(mock=True, mock_token_delay=0.01, session_secret="login-tests-" + "x" * 32,
                              session_store="memory://", api_key=KEY))
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
