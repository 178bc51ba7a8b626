"""`chatstream chat` as a user runs it: a real process on a real terminal (pexpect drives a pty)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest
from conftest import wait_until
from fastapi import FastAPI

from chatstream import ChatStream, MemorySessionStore

CHATSTREAM = str(Path(sys.executable).with_name("chatstream"))


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's console remembers its sessions in its own folder."""
    monkeypatch.setenv("CHATSTREAM_DATA_DIR", str(tmp_path))
    return tmp_path


def spawn(*args: str, token_delay: float = 0.01, timeout: float = 30) -> pexpect.spawn:
    env = {**os.environ, "CHATSTREAM_MOCK_TOKEN_DELAY": str(token_delay)}
    child = pexpect.spawn(CHATSTREAM, ["chat", *args], env=env, encoding="utf-8", timeout=timeout,
                          dimensions=(40, 200))
    child.expect_exact("you> ")
    return child


def say(child: pexpect.spawn, text: str) -> None:
    child.sendline(text)


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


class RecordingStore(MemorySessionStore):
    """The in-memory store, remembering which session was saved last, to look at the server's history."""

    session_id: str | None = None

    async def set(self, session_id: str, data: dict[str, Any], ttl_s: float, fence: str | None = None) -> None:
        await super().set(session_id, data, ttl_s, fence)
        self.session_id = session_id.split("/")[0]

    async def delete(self, session_id: str, fence: str | None = None) -> None:  # clearing deletes the session
        await super().delete(session_id, fence)
        if session_id == self.session_id:
            self.session_id = None

    def history(self) -> list[tuple[str, str]]:
        """The current conversation of the session saved last (its index, then its rows: a head and one text a message)."""
        if self.session_id not in self._data:
            return []
        index = json.loads(self._data[self.session_id][1])
        stored = self._data.get(f"{self.session_id}/{index.get('current')}")
        messages = [json.loads(text) for text in stored[1][1:]] if stored else []
        return [(m["role"], m["content"]) for m in messages]


def chat_server(serve: Any, **options: Any) -> tuple[str, ChatStream, RecordingStore]:
    store = RecordingStore()
    chat_stream = ChatStream(use_mock_response=True, session_store=store, session_secret="test", **options)
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    return serve(app).url, chat_stream, store


# -- in this process -----------------------------------------------------------------------------

def test_mock_chat_streams_replies_and_obeys_commands():
    child = spawn("--mock")
    say(child, "hello there")
    child.expect_exact("assistant> You said: hello there")
    child.expect_exact("you> ")
    say(child, "/regenerate")
    child.expect_exact("assistant> You said: hello there")
    child.expect_exact("you> ")
    say(child, "/clear")
    child.expect_exact("(conversation cleared)")
    child.expect_exact("you> ")
    say(child, "/regenerate")
    child.expect_exact("error: there is no reply to regenerate yet")
    child.expect_exact("you> ")
    say(child, "/nonsense")
    child.expect_exact("error: unknown command /nonsense")
    child.expect_exact("you> ")
    say(child, "/exit")
    assert finish(child) == 0


def test_ctrl_c_stops_the_reply_but_not_the_chat():
    child = spawn("--mock", token_delay=0.3)
    say(child, "tell me everything")
    child.expect_exact("assistant> You said:")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("you> ")
    say(child, "still there?")  # the next reply starts at once: the stopped one is gone
    child.expect_exact("You said: still there?", timeout=3)
    child.sendintr()
    child.expect_exact("you> ")
    child.sendintr()  # at the prompt: leave
    assert finish(child) == 0


def test_ctrl_d_at_the_prompt_leaves():
    child = spawn("--mock")
    child.sendeof()
    assert finish(child) == 0


def test_real_model_in_this_process():
    child = spawn("--max-new-tokens", "6", "--temperature", "0", timeout=300)
    say(child, "Hi!")
    child.expect_exact("assistant> ", timeout=120)
    child.expect_exact("you> ", timeout=120)
    say(child, "/exit")
    assert finish(child) == 0


# -- against a server ------------------------------------------------------------------------------

def test_url_chats_with_a_server_that_keeps_the_history(serve):
    url, _, store = chat_server(serve, mock_token_delay=0.01)
    child = spawn("--url", url)
    assert "mock at http://127.0.0.1" in child.before
    say(child, "first")
    child.expect_exact("assistant> You said: first")
    child.expect_exact("you> ")
    say(child, "second")
    child.expect_exact("assistant> You said: second")
    child.expect_exact("you> ")
    assert [role for role, _ in store.history()] == ["user", "assistant", "user", "assistant"]
    say(child, "/regenerate")
    child.expect_exact("assistant> You said: second")
    child.expect_exact("you> ")
    assert [text for _, text in store.history()][::2] == ["first", "second"]
    say(child, "/clear")
    child.expect_exact("(conversation cleared)")
    child.expect_exact("you> ")
    assert store.history() == []
    say(child, "/exit")
    assert finish(child) == 0


def test_ctrl_c_against_a_server_cancels_the_generation_there(serve):
    url, chat_stream, store = chat_server(serve, mock_token_delay=0.3)
    child = spawn("--url", url)
    say(child, "tell me everything")
    child.expect_exact("assistant> You said:")
    assert chat_stream.admission.running == 1
    child.sendintr()
    child.expect_exact("[stopped]")
    assert wait_until(lambda: chat_stream.admission.running == 0 and chat_stream.engine.num_running == 0, timeout=2)
    child.expect_exact("you> ")
    say(child, "again")
    child.expect_exact("assistant> You said: again", timeout=5)
    child.sendintr()
    child.expect_exact("you> ")
    say(child, "/exit")
    assert finish(child) == 0
    assert store.history()[0] == ("user", "tell me everything")  # the partial reply was kept


def test_url_shows_the_queue_position_and_a_busy_server(serve):
    url, chat_stream, _ = chat_server(
        serve, num_of_concurrent_executions=1, max_queue_size=1, mock_token_delay=0.05
    )
    child = spawn("--url", url)
    with httpx.stream("POST", f"{url}/chat_stream", json={"user_input": "occupy"}, timeout=30) as occupying:
        lines = occupying.iter_lines()
        while not next(lines).startswith("event: delta"):
            pass
        say(child, "me next")
        child.expect_exact("[waiting in the queue: position 1]")
        child.expect_exact("You said: me next")
        child.expect_exact("you> ")
    assert wait_until(lambda: chat_stream.admission.running == 0)

    with httpx.stream("POST", f"{url}/chat_stream", json={"user_input": "occupy"}, timeout=30) as first, \
            httpx.stream("POST", f"{url}/chat_stream", json={"user_input": "queued"}, timeout=30) as second:
        first_lines, second_lines = first.iter_lines(), second.iter_lines()
        next(first_lines), next(second_lines)
        assert chat_stream.admission.waiting == 1
        say(child, "any room?")
        child.expect_exact("error: the server is busy")
        child.expect_exact("you> ")
    say(child, "/exit")
    assert finish(child) == 0


def test_url_that_nobody_answers_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ}
    child = pexpect.spawn(CHATSTREAM, ["chat", "--url", f"http://127.0.0.1:{port}"], env=env,
                          encoding="utf-8", timeout=30)
    child.expect_exact(f"error: cannot reach http://127.0.0.1:{port}: connection refused")
    assert finish(child) == 1


@pytest.mark.parametrize("args", [["--url", "http://127.0.0.1:1", "--mock"], ["--temperature", "hot"]])
def test_bad_options_are_clear_errors(args):
    child = pexpect.spawn(CHATSTREAM, ["chat", *args], encoding="utf-8", timeout=30)
    child.expect("error")
    assert finish(child) == 2


def test_url_resumes_the_last_conversation_or_the_one_named(serve, own_data_dir):
    url, _, store = chat_server(serve, mock_token_delay=0.001)
    child = spawn("--url", url)
    say(child, "remember the otter")
    child.expect_exact("you> ")
    say(child, "/exit")
    assert finish(child) == 0
    saved = (own_data_dir / "console-sessions.json")
    assert oct(saved.stat().st_mode & 0o777) == "0o600"  # a session cookie is a credential

    child = spawn("--url", url)  # a new process: the same session, the same conversation
    assert "resuming \u201cremember the otter\u201d (2 messages" in child.before
    say(child, "and then?")
    child.expect_exact("you> ")
    assert [text for _, text in store.history()][::2] == ["remember the otter", "and then?"]
    say(child, "/exit")
    assert finish(child) == 0

    with httpx.Client(base_url=url, cookies={"chatstream_session": json.loads(saved.read_text())[url]}) as c:
        first = c.get("/conversations").json()["current"]
        other = c.post("/conversations", json={"title": "Other"}).json()["id"]
    child = spawn("--url", url, "--conversation", first)
    assert "resuming \u201cremember the otter\u201d (4 messages" in child.before
    say(child, "third")
    child.expect_exact("you> ")
    say(child, "/exit")
    assert finish(child) == 0
    with httpx.Client(base_url=url, cookies={"chatstream_session": json.loads(saved.read_text())[url]}) as c:
        assert len(c.get(f"/conversations/{first}").json()["messages"]) == 6
        assert c.get(f"/conversations/{other}").json()["messages"] == []

    proc = pexpect.spawn(CHATSTREAM, ["chat", "--url", url, "--conversation", "nope"], encoding="utf-8", timeout=30)
    proc.expect(pexpect.EOF)
    proc.close()
    assert proc.exitstatus == 1 and "no conversation 'nope' here" in proc.before


def test_on_a_terminal_a_finished_reply_is_drawn_again_as_markdown():
    child = spawn("--mock", token_delay=0.001)
    redrawn = []
    for text in ("a", "bb", "ccc", "dddd"):
        say(child, text)
        child.expect_exact("you> ")
        if "\x1b[J" in child.before:  # the streamed text was erased and drawn rendered
            redrawn.append(child.before.split("\x1b[J")[-1])
    say(child, "/exit")
    assert finish(child) == 0
    assert redrawn, "no reply was drawn as Markdown"
    for screen in redrawn:
        assert "assistant>" in screen and "**" not in screen and "```" not in screen
        assert "\x1b[" in screen  # styled by rich (bold, code colours)
