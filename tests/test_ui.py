"""The browser chat UI at ``/``, driven in a real headless Chromium against a real server.

The server runs the mock engine ("You said: <input>" and then a canned Markdown reply, word by
word), so every test sees the true wire protocol, queue, session cookie and history.
Chromium comes from the system (``make browser``); Playwright never downloads its own.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from chatstream.settings import Settings
from chatstream.web.app import create_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Screenshots go to test-artifacts/; with CHATSTREAM_UPDATE_SCREENSHOTS=1 they replace the ones in docs/.
DOCS = (Path(__file__).resolve().parent.parent / "docs") if os.environ.get("CHATSTREAM_UPDATE_SCREENSHOTS") else ARTIFACTS


REPLY = ".msg-assistant .content"

expect.set_options(timeout=10_000)



@pytest.fixture
def chat(serve: Callable[[Any], Any]) -> Callable[..., str]:
    """``chat(**settings)`` starts a mock-model server and returns its URL."""

    def start(**overrides: Any) -> str:
        values: dict[str, Any] = {"mock": True, "mock_token_delay": 0.02, "session_secret": "ui-tests-" + "x" * 32}
        values.update(overrides)
        return serve(create_app(Settings(**values))).url

    return start


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """``new_page(url)``: a fresh browser profile (so a fresh session cookie) showing the chat."""
    contexts = []
    errors: list[str] = []

    def open_page(url: str, viewport: dict[str, int] | None = None) -> Page:
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 820})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        expect(page.locator("#model-name")).to_have_text("mock")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def wait_for_reply(page: Page, count: int = 1) -> None:
    """Wait until ``count`` replies are on screen and no turn is running."""
    expect(page.locator(".msg-assistant")).to_have_count(count)
    expect(page.locator(".msg-assistant[aria-busy]")).to_have_count(0)
    expect(page.get_by_role("button", name="Regenerate")).to_be_visible()


def history(page: Page, url: str) -> list[dict[str, str]]:
    """The server-side conversation of this page's session (same cookie)."""
    return page.request.get(url + "/history").json()["messages"]


def wait_for_history(page: Page, url: str, count: int) -> list[dict[str, str]]:
    """A stopped turn is saved as it ends, a moment after the disconnect: poll for it."""
    deadline = time.monotonic() + 15  # seconds: a busy machine saves later
    while True:
        messages = history(page, url)
        if len(messages) >= count or time.monotonic() > deadline:
            break
        page.wait_for_timeout(25)
    if len(messages) >= count:
        return messages
    raise AssertionError(f"the history never reached {count} messages: {messages}")


class SlotHolder:
    """Occupies a generation slot from another client until released (then disconnects)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.streaming = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        long_input = "w " * 150  # echoed word by word: 150 tokens, far longer than a test needs
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", self.url + "/chat_stream", json={"user_input": long_input}) as response:
                for line in response.iter_lines():
                    if line.startswith("event: delta"):
                        self.streaming.set()
                        self.release.wait(30)
                        return

    def __enter__(self) -> SlotHolder:
        self.thread.start()
        assert self.streaming.wait(10), "the slot holder never started streaming"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join(10)


# -- the specification --


def test_a_reply_streams_in_word_by_word_and_renders_markdown(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    expect(page.locator("#empty")).to_be_visible()
    page.evaluate("""() => {
        window.__snapshots = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.msg-assistant .content');
            if (replies.length) window.__snapshots.push(replies[replies.length - 1].textContent);
        }).observe(document.getElementById('thread'), {subtree: true, childList: true, characterData: true});
    }""")

    send(page, "Hello there")

    expect(page.locator(".msg-user .content")).to_have_text("Hello there")
    expect(page.locator("#empty")).to_be_hidden()
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    wait_for_reply(page)
    expect(page.get_by_role("button", name="Send")).to_be_visible()

    final = page.locator(REPLY).text_content() or ""
    assert final.startswith("You said: Hello there")
    partials = {s for s in page.evaluate("window.__snapshots") if s.startswith("You said") and s != final}
    assert sum(final.startswith(s) for s in partials) >= 5, f"the reply did not arrive in pieces: {partials}"

    # Each canned reply has Markdown; whichever came, it was rendered, not shown as marks.
    reply = page.locator(REPLY)
    assert reply.locator("p").count() >= 2
    assert "**" not in final and "```" not in final
    expect(page.locator("#input")).to_be_focused()

    ARTIFACTS.mkdir(exist_ok=True)
    send(page, "Show me a list and some code")
    wait_for_reply(page, 2)
    page.screenshot(path=str(ARTIFACTS / "ui-exchange.png"))


def test_reload_shows_the_conversation_from_the_server(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "first message")
    wait_for_reply(page, 1)
    send(page, "second message")
    wait_for_reply(page, 2)
    shown = page.locator(REPLY).all_text_contents()

    page.reload()

    expect(page.locator(".msg")).to_have_count(4)
    roles = page.locator(".msg").evaluate_all("rows => rows.map(r => r.classList.contains('msg-user') ? 'user' : 'assistant')")
    assert roles == ["user", "assistant", "user", "assistant"]
    expect(page.locator(".msg-user .content")).to_have_text(["first message", "second message"])
    assert page.locator(REPLY).all_text_contents() == shown
    expect(page.locator("#empty")).to_be_hidden()
    assert [m["role"] for m in history(page, url)] == roles


def test_model_text_is_never_run_as_html(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    attack = "<img src=x onerror=window.__xss=1> [click me](javascript:window.__xss=2) <script>window.__xss=3</script>"

    send(page, attack)
    wait_for_reply(page)

    for _ in range(2):  # as streamed, then as rebuilt from the history
        expect(page.locator(".msg-user .content")).to_have_text(attack)
        reply = page.locator(REPLY).text_content() or ""
        assert "<img src=x onerror=window.__xss=1>" in reply
        assert "<script>window.__xss=3</script>" in reply
        assert page.locator("#thread img, #thread script").count() == 0
        assert page.locator("#thread a[href^='javascript']").count() == 0
        assert page.evaluate("window.__xss") is None
        page.reload()
        expect(page.locator(".msg")).to_have_count(2)


def test_stop_keeps_the_partial_reply_also_after_reload(chat, new_page) -> None:
    url = chat(mock_token_delay=0.05)
    page = new_page(url)
    send(page, " ".join(f"w{i}" for i in range(60)))
    expect(page.locator(REPLY)).to_contain_text("w3 ")

    page.get_by_role("button", name="Stop").click()

    expect(page.locator(".msg-assistant .note")).to_have_text("Stopped · the reply is incomplete")
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    partial = (page.locator(REPLY).text_content() or "").strip()
    assert "w59" not in partial
    messages = wait_for_history(page, url, 2)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert "w59" not in messages[1]["content"]

    page.reload()

    expect(page.locator(".msg-assistant")).to_have_count(1)
    restored = page.locator(REPLY).text_content() or ""
    assert restored.startswith(partial)
    assert "w59" not in restored
    expect(page.locator(".msg-assistant .note")).to_have_text("Stopped · the reply is incomplete")  # kept with it


def test_reloading_mid_reply_marks_it_incomplete_and_every_stats_line_survives(chat, new_page) -> None:
    url = chat(mock_token_delay=0.05)
    page = new_page(url)
    seed_each_turn(page, [2, 2])
    send(page, "a short one")
    wait_for_reply(page)
    stats = page.locator(".stats").text_content()
    assert stats and re.match(r"\d+ tokens · ", stats)
    send(page, " ".join(f"w{i}" for i in range(60)))
    expect(page.locator(REPLY).last).to_contain_text("w3 ")

    page.reload()

    replies = page.locator(".msg-assistant")
    expect(replies).to_have_count(2)
    expect(replies.last.locator(".note")).to_have_text("Stopped · the reply is incomplete")
    expect(replies.last).to_have_class(re.compile(r"\bincomplete\b"))
    assert "w59" not in (page.locator(REPLY).last.text_content() or "")
    expect(page.locator(".stats")).to_have_text([stats])  # the finished reply's numbers, as they were
    expect(replies.first.locator(".note")).to_have_count(0)


def seed_each_turn(page: Page, seeds: list[int]) -> list[dict[str, Any]]:
    """Give the page's next turns these seeds (the mock then picks different canned replies).

    Returns the list of bodies as the page sent them (before the seed was added).
    """
    sent: list[dict[str, Any]] = []

    def add_seed(route: Any) -> None:
        body = route.request.post_data_json
        sent.append(dict(body))
        body["seed"] = seeds.pop(0)
        route.continue_(post_data=json.dumps(body))

    page.route("**/chat_stream", add_seed)
    return sent


def test_regenerate_keeps_the_earlier_answer_to_flip_through(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    sent = seed_each_turn(page, [0, 1])  # seeds 0 and 1 give two different replies
    send(page, "Tell me something")
    wait_for_reply(page)
    first = page.locator(REPLY).text_content() or ""
    first_stats = page.locator(".stats").text_content() or ""
    expect(page.locator(".pager")).to_have_count(0)

    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg-assistant[aria-busy]")).to_have_count(1)
    wait_for_reply(page)

    expect(page.locator(".msg")).to_have_count(2)
    current = page.request.get(url + "/conversations").json()["current"]
    assert sent[1] == {"user_input": "", "regenerate": True, "conversation_id": current}
    second = page.locator(REPLY).text_content() or ""
    assert second != first and second.startswith("You said: Tell me something")
    expect(page.locator(".pager-position")).to_have_text("2/2")
    second_stats = page.locator(".stats").text_content() or ""
    expect(page.get_by_role("button", name="Next answer")).to_be_disabled()  # at the newest
    page.get_by_role("button", name="Previous answer").click()
    expect(page.locator(".pager-position")).to_have_text("1/2")
    expect(page.locator(REPLY)).to_have_text(first)
    # Each answer shows its own numbers (the two canned replies differ in length).
    expect(page.locator(".stats")).to_have_text(first_stats)
    assert first_stats.split(" · ")[0] != second_stats.split(" · ")[0]
    # The answer shown is the one the conversation goes on from, also after a reload.
    reply = history(page, url)[1]
    assert reply["version"] == 0 and len(reply["alternatives"]) == 1 and reply["content"] != reply["alternatives"][0]
    page.reload()
    expect(page.locator(".pager-position")).to_have_text("1/2")
    expect(page.locator(REPLY)).to_have_text(first)
    expect(page.locator(".stats")).to_have_text(first_stats)
    page.get_by_role("button", name="Next answer").click()
    expect(page.locator(".pager-position")).to_have_text("2/2")
    expect(page.locator(REPLY)).to_have_text(second)
    expect(page.locator(".stats")).to_have_text(second_stats)
    messages = history(page, url)
    assert [m["role"] for m in messages] == ["user", "assistant"] and "version" not in messages[1]


def test_new_chat_empties_the_conversation(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "Remember this")
    wait_for_reply(page)

    page.get_by_role("button", name="New chat").click()

    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    # The earlier conversation is kept, listed below the new one.
    expect(page.locator(".conversation-open")).to_have_text(["Untitled", "Remember this"])
    page.reload()
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator(".msg")).to_have_count(0)
    assert history(page, url) == []
    # A second click on an empty chat makes no second empty conversation.
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".conversation-open")).to_have_count(2)


def test_new_chat_while_streaming_stops_and_clears(chat, new_page) -> None:
    url = chat(mock_token_delay=0.05)
    page = new_page(url)
    send(page, " ".join(["long"] * 100))
    expect(page.locator(REPLY)).to_contain_text("long long")

    page.get_by_role("button", name="New chat").click()

    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#notice")).to_be_hidden()
    assert history(page, url) == []


def test_enter_sends_shift_enter_adds_a_line_and_ime_enter_does_not_send(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    box = page.locator("#input")

    box.press_sequentially("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    expect(box).to_have_value("line one\nline two")

    # The Enter that confirms an IME composition (isComposing; keyCode 229 in some browsers).
    for init in ("{key: 'Enter', code: 'Enter', isComposing: true}", "{key: 'Enter', code: 'Enter', keyCode: 229}"):
        not_handled = box.evaluate(
            f"(el) => el.dispatchEvent(new KeyboardEvent('keydown', {{...{init}, bubbles: true, cancelable: true}}))"
        )
        assert not_handled, "the page swallowed an IME Enter"
    expect(box).to_have_value("line one\nline two")
    assert page.locator(".msg").count() == 0

    box.press("Enter")

    expect(page.locator(".msg-user .content")).to_have_text("line one\nline two")
    expect(box).to_have_value("")
    wait_for_reply(page)


def test_waiting_in_the_queue_shows_the_position(chat, new_page) -> None:
    url = chat(concurrency=1, queue_size=2, mock_token_delay=0.05)
    page = new_page(url)
    with SlotHolder(url):
        send(page, "Am I queued?")
        expect(page.locator(".msg-assistant")).to_contain_text("Waiting in queue: position 1")
    wait_for_reply(page)
    assert (page.locator(REPLY).text_content() or "").startswith("You said: Am I queued?")


def test_a_full_server_says_busy_and_offers_retry(chat, new_page) -> None:
    url = chat(concurrency=1, queue_size=0)
    page = new_page(url)
    page.clock.install()
    with SlotHolder(url):
        with page.expect_response("**/chat_stream") as answer:
            send(page, "Is there room?")
        assert answer.value.status == 503
        retry_after = int(answer.value.headers["retry-after"])

        notice = page.locator("#notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text("busy")
        retry = page.locator("#notice-retry")
        expect(retry).to_be_disabled()
        expect(retry).to_have_text(f"Retry in {retry_after} s")
        expect(page.locator(".msg")).to_have_count(0)  # nothing was kept by the server, nor shown
        expect(page.locator("#input")).to_have_value("Is there room?")

    page.clock.run_for(retry_after * 1000 + 1000)
    expect(retry).to_be_enabled()
    expect(retry).to_have_text("Retry")
    retry.click()
    expect(notice).to_be_hidden()
    wait_for_reply(page)
    assert (page.locator(REPLY).text_content() or "").startswith("You said: Is there room?")


def test_a_busy_session_and_a_network_failure_are_explained(chat, new_page) -> None:
    url = chat(mock_token_delay=0.05)
    page = new_page(url)
    send(page, "First")
    wait_for_reply(page)
    # Another tab of the same session is generating in this conversation: the server answers 409, naming it.
    page.evaluate("""() => {
        window.__other = new AbortController();
        fetch('chat_stream', {method: 'POST', body: JSON.stringify({user_input: 'x '.repeat(100)}),
                              headers: {'Content-Type': 'application/json'}, signal: window.__other.signal})
            .then(r => { window.__otherStreaming = r.ok; return r.body.getReader().read(); }).catch(() => {});
    }""")
    page.wait_for_function("window.__otherStreaming === true")  # it holds the conversation (not a timed wait)
    send(page, "Me too")
    expect(page.locator("#notice")).to_contain_text("A reply is already being written in this conversation")
    expect(page.locator("#notice-retry")).to_be_enabled()
    page.evaluate("window.__other.abort()")
    wait_for_history(page, url, 4)  # the other turn ended and let go of the conversation

    page.route("**/chat_stream", lambda route: route.abort("internetdisconnected"))
    page.locator("#input").fill("")
    page.locator("#notice-retry").click()
    expect(page.locator("#notice")).to_contain_text("Could not reach the server")
    expect(page.locator("#input")).to_have_value("Me too")

    page.unroute("**/chat_stream")
    page.locator("#notice-retry").click()
    wait_for_reply(page, 2)


def test_phone_sized_screen(chat, new_page) -> None:
    url = chat()
    page = new_page(url, viewport={"width": 390, "height": 844})
    send(page, "Hello from a phone")
    wait_for_reply(page)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "the page scrolls sideways on a phone"
    composer = page.locator("#composer").bounding_box()
    assert composer is not None and composer["y"] + composer["height"] <= 844
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-phone.png"))


# -- several conversations --


def sidebar_titles(page: Page) -> list[str]:
    return page.locator(".conversation-open").all_text_contents()


def test_sidebar_lists_switches_renames_and_deletes_conversations(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "About cats")
    wait_for_reply(page)
    expect(page.locator(".conversation-open")).to_have_text(["About cats"])  # titled by the first message

    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "About dogs")
    wait_for_reply(page)
    expect(page.locator(".conversation-open")).to_have_text(["About dogs", "About cats"])  # newest first
    expect(page.locator(".conversation-open[aria-current]")).to_have_text("About dogs")

    page.get_by_role("button", name="About cats", exact=True).click()
    expect(page.locator(".msg-user .content")).to_have_text(["About cats"])
    expect(page.locator(".conversation-open[aria-current]")).to_have_text("About cats")
    send(page, "More about cats")
    wait_for_reply(page, 2)
    expect(page.locator(".conversation-open")).to_have_text(["About cats", "About dogs"])

    page.get_by_role("button", name="Rename About dogs").click()
    box = page.get_by_label("New title")
    box.fill("Dogs, renamed")
    box.press("Enter")
    expect(page.locator(".conversation-open")).to_have_text(["About cats", "Dogs, renamed"])

    page.reload()  # the current conversation and every title come back from the server
    expect(page.locator(".msg-user .content")).to_have_text(["About cats", "More about cats"])
    expect(page.locator(".conversation-open")).to_have_text(["About cats", "Dogs, renamed"])
    expect(page.locator(".conversation-open[aria-current]")).to_have_text("About cats")

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete About cats").click()
    expect(page.locator(".conversation-open")).to_have_text(["Dogs, renamed"])
    expect(page.locator(".msg-user .content")).to_have_text(["About dogs"])  # the next one is shown
    page.once("dialog", lambda dialog: dialog.dismiss())  # "Cancel" deletes nothing
    page.get_by_role("button", name="Delete Dogs, renamed").click()
    expect(page.locator(".conversation-open")).to_have_count(1)
    listed = page.request.get(url + "/conversations").json()
    assert [c["title"] for c in listed["conversations"]] == ["Dogs, renamed"]


def test_everything_survives_a_server_restart(chat, new_page, tmp_path: Path) -> None:
    url = chat(data_dir=str(tmp_path))
    page = new_page(url)
    send(page, "Kept across restarts")
    wait_for_reply(page)
    page.get_by_role("button", name="New chat").click()
    send(page, "The second one")
    wait_for_reply(page)
    page.get_by_role("button", name="Kept across restarts", exact=True).click()
    expect(page.locator(".msg-user .content")).to_have_text(["Kept across restarts"])
    shown = page.locator(REPLY).all_text_contents()

    restarted = chat(data_dir=str(tmp_path))  # another server process on the same data folder
    page.goto(restarted + "/")  # cookies are per host, not per port: the same session

    expect(page.locator(".conversation-open")).to_have_text(["The second one", "Kept across restarts"])
    expect(page.locator(".conversation-open[aria-current]")).to_have_text("Kept across restarts")
    expect(page.locator(".msg-user .content")).to_have_text(["Kept across restarts"])
    assert page.locator(REPLY).all_text_contents() == shown


def test_edit_a_sent_message_and_resend(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    for count, text in enumerate(("first question", "second question", "third question"), 1):
        send(page, text)
        wait_for_reply(page, count)

    page.locator(".msg-user").nth(1).get_by_role("button", name="Edit").click()
    editor = page.get_by_label("Edit message")
    expect(editor).to_have_value("second question")
    editor.fill("second, rephrased")
    editor.press("Enter")

    wait_for_reply(page, 2)
    expect(page.locator(".msg-user .content")).to_have_text(["first question", "second, rephrased"])
    assert (page.locator(REPLY).nth(1).text_content() or "").startswith("You said: second, rephrased")
    assert [m["content"] for m in history(page, url) if m["role"] == "user"] == ["first question", "second, rephrased"]

    # Escape leaves the message as it was.
    page.locator(".msg-user").nth(0).get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("never sent")
    page.get_by_label("Edit message").press("Escape")
    expect(page.locator(".msg-user .content")).to_have_text(["first question", "second, rephrased"])

    # The version it replaced is kept, with the replies after it: a pager on the edited message flips back.
    edited = page.locator(".msg-user").nth(1)
    expect(edited.locator(".pager-position")).to_have_text("2/2")
    expect(page.locator(".msg-user").nth(0).locator(".pager")).to_have_count(0)
    edited.get_by_role("button", name="Previous version").click()
    expect(page.locator(".msg-user .content")).to_have_text(["first question", "second question", "third question"])
    expect(page.locator(".msg-assistant")).to_have_count(3)
    expect(page.locator(".msg-user").nth(1).locator(".pager-position")).to_have_text("1/2")
    assert [m["content"] for m in history(page, url) if m["role"] == "user"] == [
        "first question", "second question", "third question"]  # the conversation goes on from this version
    page.reload()
    expect(page.locator(".msg-user .content")).to_have_text(["first question", "second question", "third question"])
    page.locator(".msg-user").nth(1).get_by_role("button", name="Next version").click()
    expect(page.locator(".msg-user .content")).to_have_text(["first question", "second, rephrased"])
    expect(page.locator(".msg-user").nth(1).locator(".pager-position")).to_have_text("2/2")
    assert (page.locator(REPLY).nth(1).text_content() or "").startswith("You said: second, rephrased")
    send(page, "and on")  # the conversation goes on from the version shown
    wait_for_reply(page, 3)
    assert [m["content"] for m in history(page, url) if m["role"] == "user"] == [
        "first question", "second, rephrased", "and on"]


def test_titles_come_from_the_first_line_and_follow_its_edits_until_renamed(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "Plan a three day trip to the mountains with my family and dog\nWe like hiking.")
    wait_for_reply(page)
    expect(page.locator(".conversation-open")).to_have_text(["Plan a three day trip to the mountains…"])

    page.locator(".msg-user").first.get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("Best pasta recipes")
    page.get_by_label("Edit message").press("Enter")
    wait_for_reply(page)
    expect(page.locator(".conversation-open")).to_have_text(["Best pasta recipes"])

    page.get_by_role("button", name="Rename Best pasta recipes").click()
    page.get_by_label("New title").fill("Food")
    page.get_by_label("New title").press("Enter")
    expect(page.locator(".conversation-open")).to_have_text(["Food"])
    page.locator(".msg-user").first.get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("Best soup recipes")
    page.get_by_label("Edit message").press("Enter")
    wait_for_reply(page)
    expect(page.locator(".msg-user .content")).to_have_text(["Best soup recipes"])
    expect(page.locator(".conversation-open")).to_have_text(["Food"])  # the user's title stays


def test_settings_apply_to_the_conversation_and_bad_values_are_explained(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "hello")
    wait_for_reply(page)

    page.get_by_role("button", name="Settings").click()
    dialog = page.get_by_role("dialog", name="Conversation settings")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Temperature").fill("7")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog.get_by_role("alert")).to_have_text("Temperature must be between 0 and 2.")
    expect(dialog).to_be_visible()  # kept open, nothing stored
    assert page.request.get(url + "/conversations").json()["conversations"][0]["settings"] == {}

    dialog.get_by_label("Temperature").fill("0.3")
    dialog.get_by_label("Max tokens").fill("3")
    dialog.get_by_label("System prompt").fill("Answer like a pirate.")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    stored = page.request.get(url + "/conversations").json()["conversations"][0]["settings"]
    assert stored == {"temperature": 0.3, "max_tokens": 3, "system_prompt": "Answer like a pirate."}

    send(page, "a long story please")
    wait_for_reply(page, 2)
    expect(page.locator(".msg-assistant .note").last).to_contain_text("length limit")
    expect(page.locator(".stats").last).to_contain_text("3 tokens")

    page.reload()
    expect(page.locator(".msg-assistant .note").last).to_contain_text("length limit")  # kept with the reply
    expect(page.locator(".stats").last).to_contain_text("3 tokens")
    page.get_by_role("button", name="Settings").click()
    expect(dialog.get_by_label("Max tokens")).to_have_value("3")
    expect(dialog.get_by_label("System prompt")).to_have_value("Answer like a pirate.")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()


def test_stats_line_and_the_last_actions_stay_in_view(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    for n in range(4):  # enough to scroll
        send(page, f"message {n}")
        wait_for_reply(page, n + 1)
    assert page.evaluate("document.getElementById('log').scrollHeight > document.getElementById('log').clientHeight")

    stats = page.locator(".stats").last
    expect(stats).to_have_text(re.compile(r"^\d+ tokens · \d+\.\d tokens/s · \d+\.\d\d s to first token$"))
    regenerate = page.get_by_role("button", name="Regenerate")
    expect(regenerate).to_be_in_viewport(ratio=1)
    button, log = regenerate.bounding_box(), page.locator("#log").bounding_box()
    dock = page.locator(".dock").bounding_box()
    assert button and log and dock
    assert button["y"] + button["height"] <= min(log["y"] + log["height"], dock["y"]), "the actions are under the message box"


def test_export_as_markdown_and_json(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "Export me")
    wait_for_reply(page)

    page.locator("#export-menu summary").click()
    with page.expect_download() as markdown:
        page.get_by_role("button", name="Markdown (.md)").click()
    text = Path(markdown.value.path()).read_text()
    assert markdown.value.suggested_filename == "Export me.md"
    assert text.startswith("# Export me\n\n## You\n\nExport me\n\n## Assistant\n\nYou said: Export me")

    page.locator("#export-menu summary").click()
    with page.expect_download() as exported:
        page.get_by_role("button", name="JSON (.json)").click()
    body = json.loads(Path(exported.value.path()).read_text())
    assert body["title"] == "Export me"
    assert body["messages"] == page.request.get(f"{url}/conversations/{body['id']}").json()["messages"]
    assert body["messages"][1]["details"]["finish_reason"] == "stop"  # how the reply ended goes with it


def test_screenshots_for_the_docs(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "What is streaming?")
    wait_for_reply(page)
    page.get_by_role("button", name="New chat").click()
    send(page, "Show me a list and some code")
    wait_for_reply(page)
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "ui-desktop.png"), animations="disabled")

    phone = new_page(url, viewport={"width": 390, "height": 844})
    send(phone, "Hello from a phone")
    wait_for_reply(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    expect(phone.locator("#sidebar")).not_to_be_in_viewport()
    phone.screenshot(path=str(DOCS / "ui-mobile.png"), animations="disabled")
    phone.get_by_role("button", name="Conversations").click()
    expect(phone.locator("#sidebar")).to_be_in_viewport()
    expect(phone.locator(".conversation-open")).to_have_text(["Hello from a phone"])
    phone.screenshot(path=str(DOCS / "ui-mobile-sidebar.png"), animations="disabled")
    phone.keyboard.press("Escape")
    expect(phone.locator("#sidebar")).not_to_be_in_viewport()


def test_code_is_highlighted_and_math_is_typeset(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    seed_each_turn(page, [1])  # seed 1: the canned reply with a Python code block
    send(page, "Euler: $e^{i\\pi} + 1 = 0$ costs $5 or $6\n\n$$\n\\int_0^1 x^2\\,dx = \\frac{1}{3}\n$$\n\n"
               "and $\\href{javascript:window.__xss=1}{click}$")
    wait_for_reply(page)

    reply = page.locator(REPLY)
    expect(reply.locator(".md-code .md-code-lang")).to_have_text("python")
    expect(reply.locator(".md-code code .hljs-string")).to_have_text(['"hello"'])  # coloured by highlight.js
    inline = reply.locator("p math").first
    expect(inline).to_be_visible()
    assert "π" in (inline.text_content() or "")
    block = reply.locator(".md-math math[display='block']")
    expect(block).to_have_count(1)
    expect(block.locator("mfrac")).to_have_count(1)
    expect(reply).to_contain_text("costs $5 or $6")  # money is not math
    assert page.locator("#thread a[href^='javascript'], #thread [href^='javascript']").count() == 0
    page.locator("#thread math").last.click()
    assert page.evaluate("window.__xss") is None
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "ui-code-and-math.png"), animations="disabled")


def test_backslash_math_is_typeset_and_code_keeps_its_backslashes(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "Pythagoras: \\( a^2 + b^2 = c^2 \\) and\n\n\\[\n\\frac{a}{b}\n\\]\n\nalso \\[ x_1 \\] inline; "
               "code `\\(x\\)` stays\n\n```\nprint(\"\\[not math\\]\")\n```\n\nand \\(unclosed")
    wait_for_reply(page)

    reply = page.locator(REPLY)
    inline = reply.locator("p math:not([display='block'])").first
    expect(inline.locator("msup")).to_have_count(3)  # a², b², c²
    expect(reply.locator(".md-math math[display='block'] mfrac")).to_have_count(1)
    expect(reply.locator("p math[display='block'] msub")).to_have_count(1)  # \[ ... \] inside a line
    text = reply.text_content() or ""
    assert "( a^2" not in text and "\\( a^2" not in text, "the delimiters were shown, not typeset"
    expect(reply.locator("p code")).to_have_text("\\(x\\)")  # a code span is left alone
    expect(reply.locator(".md-code pre")).to_have_text('print("\\[not math\\]")')
    assert "(unclosed" in text  # an unclosed \( is plain text


def test_settings_show_the_server_defaults_refuse_what_is_out_of_range_and_set_defaults_for_all_chats(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "hello")
    wait_for_reply(page)
    conversation_id = page.request.get(url + "/conversations").json()["current"]

    page.get_by_role("button", name="Settings").click()
    dialog = page.get_by_role("dialog", name="Conversation settings")
    # Each empty field shows the value the server will use.
    for label, default in (("Temperature", "0.7"), ("Top-p", "0.9"), ("Max tokens", "256"), ("Top-k", "50"),
                           ("Seed", "random")):
        expect(dialog.get_by_label(label)).to_have_attribute("placeholder", default)
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "ui-settings.png"), animations="disabled")

    # Out of range is explained in words for people, and nothing is stored (no silent clamp to 256).
    alert = dialog.get_by_role("alert")
    for label, value, message in (
        ("Max tokens", "100000", "Max tokens must be between 1 and 256 (this server's limit)."),
        ("Max tokens", "2.5", "Max tokens must be a whole number."),
        ("Top-p", "0", "Top-p must be more than 0 and at most 1."),
        ("Top-k", "-1", re.compile(r"^Top-k must be between 0 \(off\) and \d+\.$")),
    ):
        dialog.get_by_label(label).fill(value)
        dialog.get_by_role("button", name="Save").click()
        expect(alert).to_have_text(message)
        expect(dialog.get_by_label(label)).to_have_attribute("aria-invalid", "true")
        dialog.get_by_label(label).fill("")
    assert page.request.get(url + "/conversations").json()["conversations"][0]["settings"] == {}
    # The server refuses it too, rather than storing 256.
    refused = page.request.patch(f"{url}/conversations/{conversation_id}", data={"settings": {"max_tokens": 100000}})
    assert refused.status == 400 and "at most 256" in refused.json()["message"]

    # Seed and stop: seed 1 picks the mock's code reply, and the stop sequence ends it before the code.
    dialog.get_by_label("Seed").fill("1")
    dialog.get_by_label("Stop sequences").fill("```")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    stored = page.request.get(url + "/conversations").json()["conversations"][0]["settings"]
    assert stored == {"seed": 1, "stop": ["```"]}
    send(page, "code please")
    wait_for_reply(page, 2)
    last = page.locator(REPLY).last
    expect(last).to_contain_text("Second point")  # seed 1's reply ...
    expect(last.locator(".md-code")).to_have_count(0)  # ... cut at the stop sequence before its code
    assert "Anything else" not in (last.text_content() or "")

    # Defaults for all chats: stored in the session, used by a new chat, shown as its placeholders.
    page.get_by_role("button", name="Settings").click()
    dialog.get_by_label("Defaults for all chats").check()
    expect(dialog.get_by_label("Seed")).to_have_value("")
    dialog.get_by_label("Temperature").fill("3")
    dialog.get_by_role("button", name="Save").click()
    expect(alert).to_have_text("Temperature must be between 0 and 2.")
    dialog.get_by_label("Temperature").fill("0.2")
    dialog.get_by_label("Seed").fill("1")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    assert page.request.get(url + "/settings").json()["defaults"] == {"temperature": 0.2, "seed": 1}
    page.get_by_role("button", name="New chat").click()
    send(page, "code again")
    wait_for_reply(page)
    expect(page.locator(REPLY).locator(".md-code .md-code-lang")).to_have_text("python")  # seed 1 from the defaults
    page.get_by_role("button", name="Settings").click()
    expect(dialog.get_by_label("Temperature")).to_have_value("")
    expect(dialog.get_by_label("Temperature")).to_have_attribute("placeholder", "0.2")
    expect(dialog.get_by_label("Seed")).to_have_attribute("placeholder", "1")
    dialog.get_by_role("button", name="Cancel").click()
    bad = page.request.patch(url + "/settings", data={"defaults": {"temperature": 5}})
    assert bad.status == 400 and page.request.get(url + "/settings").json()["defaults"] == {"temperature": 0.2, "seed": 1}


def test_a_busy_notice_from_a_second_tab_says_where_the_reply_is_being_written(chat, new_page) -> None:
    url = chat(mock_token_delay=0.05)
    page = new_page(url)
    send(page, "About cats")
    wait_for_reply(page)
    page.get_by_role("button", name="New chat").click()
    send(page, "About dogs")
    wait_for_reply(page)
    other = page.context.new_page()  # a second tab: the same session
    other.goto(url + "/")
    other.get_by_role("button", name="About cats", exact=True).click()
    expect(other.locator(".msg-user .content")).to_have_text(["About cats"])

    page.locator("#input").fill("dogs " * 80)
    page.locator("#input").press("Enter")
    expect(page.locator(REPLY).last).to_contain_text("dogs dogs")
    # Each conversation has its own lock: the cats conversation answers while the dogs one streams.
    send(other, "More about cats")
    wait_for_reply(other, 2)
    notice = other.locator("#notice")
    expect(notice).to_be_hidden()
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    wait_for_history(page, url, 4)

    # A 409 names the busy conversation (conversation_id): the notice says which one.
    dogs = next(c["id"] for c in page.request.get(url + "/conversations").json()["conversations"]
                if c["title"] == "About dogs")
    busy = json.dumps({"error": "session_busy", "message": "busy", "conversation_id": dogs})
    other.route("**/chat_stream", lambda route: route.fulfill(status=409, body=busy, content_type="application/json"))
    send(other, "Even more about cats")
    expect(notice).to_contain_text("A reply is already being written in “About dogs” (perhaps in another tab)")
    expect(other.locator("#input")).to_have_value("Even more about cats")  # nothing typed is lost
    other.unroute("**/chat_stream")
    other.locator("#notice-retry").click()
    wait_for_reply(other, 3)
    other.close()


def test_the_page_does_not_move_when_a_reply_starts_or_ends(chat, new_page) -> None:
    url = chat()
    page = new_page(url)
    send(page, "hello")
    wait_for_reply(page)
    # Every frame: the height of each row on screen.
    page.evaluate("""() => {
        window.__heights = [];
        const tick = () => {
            window.__heights.push([...document.querySelectorAll('.msg')].map(r => Math.round(r.getBoundingClientRect().height)));
            window.__tick = requestAnimationFrame(tick);
        };
        tick();
    }""")
    send(page, "again")
    wait_for_reply(page, 2)
    page.wait_for_timeout(200)
    frames = page.evaluate("cancelAnimationFrame(window.__tick) || window.__heights")

    earlier = {tuple(frame[:2]) for frame in frames}
    assert len(earlier) == 1, f"the earlier messages changed height during the turn: {sorted(earlier)}"
    growing = [frame[3] for frame in frames if len(frame) == 4]
    assert frames[-1][2] == frames[0][0]  # the new user message is as tall as the first (its Edit row is there)
    assert growing == sorted(growing), f"the new reply shrank (the page jumped): {growing}"


def test_the_status_dot_turns_grey_when_the_server_stops_answering(serve, new_page, browser: Browser) -> None:
    servers = [serve(create_app(Settings(mock=True, session_secret="ui-tests-" + "x" * 32))) for _ in range(2)]
    # A failed request checks at once.
    page = new_page(servers[0].url)
    expect(page.locator("#model-dot")).to_have_attribute("data-state", "ok")
    servers[0].stop()
    send(page, "anyone there?")
    expect(page.locator("#notice")).to_contain_text("Could not reach the server")
    expect(page.locator("#model-dot")).to_have_attribute("data-state", "offline")
    expect(page.locator("#model")).to_have_attribute("title", "Model status: the server does not answer")
    expect(page.locator("#model-name")).to_have_text("mock · offline")

    # An idle page finds out with its next periodic check.
    context = browser.new_context()
    idle = context.new_page()
    idle.clock.install()
    idle.goto(servers[1].url + "/")
    expect(idle.locator("#model-dot")).to_have_attribute("data-state", "ok")
    servers[1].stop()
    idle.clock.run_for(16_000)
    expect(idle.locator("#model-dot")).to_have_attribute("data-state", "offline")
    context.close()


def test_a_jump_to_bottom_button_shows_when_scrolled_up_during_a_reply(chat, new_page) -> None:
    url = chat(mock_token_delay=0.05)
    page = new_page(url, viewport={"width": 900, "height": 600})
    jump = page.get_by_role("button", name="Jump to the latest message")
    for n in range(2):
        send(page, f"message {n}")
        wait_for_reply(page, n + 1)
    expect(jump).to_be_hidden()
    send(page, " ".join(["long"] * 120))
    expect(page.locator(REPLY).last).to_contain_text("long long")

    page.locator("#log").evaluate("log => { log.scrollTop = 0; }")
    expect(jump).to_be_visible()
    page.wait_for_timeout(300)
    assert page.locator("#log").evaluate("log => log.scrollTop") == 0  # the stream does not pull the reader back down

    jump.click()
    expect(jump).to_be_hidden()
    assert page.locator("#log").evaluate("log => log.scrollHeight - log.scrollTop - log.clientHeight") < 120
    page.get_by_role("button", name="Stop").click()


def test_a_reply_being_written_shows_so_in_another_tab_and_then_how_it_ended(chat, new_page) -> None:
    url = chat(mock_token_delay=0.05)
    page = new_page(url)
    send(page, " ".join(f"w{i}" for i in range(60)))
    expect(page.locator(REPLY)).to_contain_text("w10 ")

    other = page.context.new_page()  # the same session, opened while the reply streams
    other.goto(url + "/")
    expect(other.locator(".msg-assistant .note")).to_have_text("Still being written · incomplete so far")
    wait_for_reply(page)
    stats = page.locator(".stats").text_content() or ""

    expect(other.locator(".stats")).to_have_text(stats)  # read again until the reply ended
    expect(other.locator(".msg-assistant .note")).to_have_count(0)
    expect(other.locator(REPLY)).to_have_text(page.locator(REPLY).text_content() or "")
    other.close()
