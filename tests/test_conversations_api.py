"""Several conversations per user through /conversations, /chat_stream, /history and /clear_context.

A real server (the mock engine) on 127.0.0.1, a real session store; each client is a user with
its own cookie.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import parse_sse
from fastapi import FastAPI, Request
from itsdangerous import TimestampSigner

from chatstream import ChatStream
from chatstream.service import conversations as book
from chatstream.session import MemorySessionStore, SQLiteSessionStore
from chatstream.settings import Settings
from chatstream.web.app import create_app

SECRET = "conversation-tests-" + "x" * 32


@pytest.fixture
def server(serve: Callable[[Any], Any], tmp_path: Path) -> Callable[..., str]:
    def start(**overrides: Any) -> str:
        values: dict[str, Any] = {"mock": True, "mock_token_delay": 0.001, "session_secret": SECRET,
                                  "data_dir": str(tmp_path)}
        values.update(overrides)
        return serve(create_app(Settings(**values))).url

    return start


@pytest.fixture
def client(server: Callable[..., str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server(), timeout=10) as c:
        yield c


def chat(client: httpx.Client, text: str, **extra: Any) -> httpx.Response:
    r = client.post("/chat_stream", json={"user_input": text, **extra})
    assert r.status_code == 200, r.text
    return r


def done(r: httpx.Response) -> dict[str, Any]:
    events = parse_sse(r.text)
    assert events[-1][0] == "done", events[-1]
    return events[-1][1]


def test_a_new_user_has_no_conversations_and_reading_creates_no_session(client) -> None:
    r = client.get("/conversations")
    assert r.status_code == 200
    assert r.json() == {"conversations": [], "current": None, "limit": book.MAX_CONVERSATIONS}
    assert "set-cookie" not in r.headers


def test_the_first_message_starts_a_titled_conversation(client) -> None:
    chat(client, "What is   the capital of France?")
    listed = client.get("/conversations").json()
    assert len(listed["conversations"]) == 1
    summary = listed["conversations"][0]
    assert summary["title"] == "What is the capital of France?"
    assert summary["message_count"] == 2
    assert listed["current"] == summary["id"]
    one = client.get(f"/conversations/{summary['id']}").json()
    assert [m["role"] for m in one["messages"]] == ["user", "assistant"]
    # The conversation also says how each reply ended (the UI shows it again after a reload); /history does not.
    details = one["messages"][1].pop("details")
    assert details["finish_reason"] == "stop" and details["completion_tokens"] > 0
    assert one["messages"] == client.get("/history").json()["messages"]


def test_create_switch_and_chat_in_each_conversation(client) -> None:
    chat(client, "first topic")
    first = client.get("/conversations").json()["current"]
    r = client.post("/conversations", json={"title": "Second"})
    assert r.status_code == 201
    second = r.json()["id"]
    assert r.json()["title"] == "Second" and r.json()["message_count"] == 0
    assert client.get("/conversations").json()["current"] == second
    assert client.get("/history").json()["messages"] == []  # the current one is the new, empty one

    chat(client, "second topic")
    chat(client, "back to the first", conversation_id=first)

    first_messages = client.get("/history", params={"conversation_id": first}).json()["messages"]
    second_messages = client.get("/history", params={"conversation_id": second}).json()["messages"]
    assert [m["content"] for m in first_messages if m["role"] == "user"] == ["first topic", "back to the first"]
    assert [m["content"] for m in second_messages if m["role"] == "user"] == ["second topic"]
    listed = client.get("/conversations").json()
    assert [c["id"] for c in listed["conversations"]] == [first, second]  # newest first
    assert listed["current"] == first  # the one last used

    r = client.patch(f"/conversations/{second}", json={"current": True})
    assert r.status_code == 200
    assert client.get("/conversations").json()["current"] == second
    assert client.get("/history").json()["messages"] == second_messages


def test_rename_and_delete(client) -> None:
    chat(client, "one")
    chat(client, "two", conversation_id=client.post("/conversations").json()["id"])
    older, newer = reversed([c["id"] for c in client.get("/conversations").json()["conversations"]])

    r = client.patch(f"/conversations/{older}", json={"title": "  Renamed\n title "})
    assert r.status_code == 200 and r.json()["title"] == "Renamed title"

    r = client.delete(f"/conversations/{newer}")
    assert r.status_code == 200 and r.json() == {"deleted": newer, "current": older}
    assert [c["title"] for c in client.get("/conversations").json()["conversations"]] == ["Renamed title"]
    assert client.get(f"/conversations/{newer}").status_code == 404
    assert client.delete(f"/conversations/{newer}").status_code == 404


def test_clear_context_with_an_id_empties_that_conversation_only(client) -> None:
    chat(client, "keep me")
    kept = client.get("/conversations").json()["current"]
    emptied = client.post("/conversations", json={"title": "Scratch"}).json()["id"]
    chat(client, "forget me", conversation_id=emptied)

    r = client.post("/clear_context", params={"conversation_id": emptied})
    assert r.status_code == 200
    assert client.get(f"/conversations/{emptied}").json()["messages"] == []
    assert client.get(f"/conversations/{emptied}").json()["title"] == "Scratch"
    assert len(client.get(f"/conversations/{kept}").json()["messages"]) == 2


def test_another_users_conversation_is_404_and_never_shown(server) -> None:
    url = server()
    with httpx.Client(base_url=url) as alice, httpx.Client(base_url=url) as mallory:
        chat(alice, "my secret plans")
        secret_id = alice.get("/conversations").json()["current"]
        chat(mallory, "hello")  # mallory has a session of her own

        for r in (
            mallory.get(f"/conversations/{secret_id}"),
            mallory.patch(f"/conversations/{secret_id}", json={"title": "mine now"}),
            mallory.delete(f"/conversations/{secret_id}"),
            mallory.get("/history", params={"conversation_id": secret_id}),
            mallory.post("/clear_context", params={"conversation_id": secret_id}),
            mallory.post("/chat_stream", json={"user_input": "x", "conversation_id": secret_id}),
        ):
            assert r.status_code == 404, r.text
            assert r.json()["error"] == "conversation_not_found"
            assert "secret" not in r.text
        with httpx.Client(base_url=url) as stranger:  # no session at all
            assert stranger.get(f"/conversations/{secret_id}").status_code == 404
        one = alice.get(f"/conversations/{secret_id}").json()
        assert one["title"] == "my secret plans" and len(one["messages"]) == 2


@pytest.mark.parametrize("method, path, body, param", [
    ("post", "/conversations", {"title": ""}, "title"),
    ("post", "/conversations", {"title": "x" * 201}, "title"),
    ("post", "/conversations", {"title": 5}, "title"),
    ("post", "/conversations", {"colour": "red"}, "colour"),
    ("post", "/conversations", {"settings": {"temperature": 2.5}}, "settings.temperature"),
    ("post", "/conversations", {"settings": {"temperature": -1}}, "settings.temperature"),
    ("post", "/conversations", {"settings": {"top_p": 0}}, "settings.top_p"),
    ("post", "/conversations", {"settings": {"max_tokens": 0}}, "settings.max_tokens"),
    ("post", "/conversations", {"settings": {"max_tokens": "many"}}, "settings.max_tokens"),
    ("post", "/conversations", {"settings": {"system_prompt": 3}}, "settings.system_prompt"),
    ("post", "/conversations", {"settings": {"min_p": 0.1}}, "settings.min_p"),
    ("post", "/conversations", {"settings": {"stop": [""]}}, "settings.stop"),
    ("post", "/conversations", {"settings": {"seed": 1.5}}, "settings.seed"),
    ("post", "/conversations", {"settings": []}, "settings"),
    ("patch", "/conversations/{id}", {}, None),
    ("patch", "/conversations/{id}", {"current": False}, "current"),
    ("patch", "/conversations/{id}", {"settings": {"top_p": 1.5}}, "settings.top_p"),
    ("get", "/conversations/bad%20id!", None, None),
    ("get", "/history?conversation_id=" + "x" * 65, None, None),
])
def test_bad_input_is_a_clear_400_and_changes_nothing(client, method, path, body, param) -> None:
    chat(client, "hello")
    before = client.get("/conversations").json()
    conversation_id = before["current"]
    kwargs = {"json": body} if body is not None else {}
    r = getattr(client, method)(path.replace("{id}", conversation_id), **kwargs)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request" and r.json()["message"]
    if param:
        assert param.split(".")[-1] in r.json()["message"]
    assert client.get("/conversations").json() == before


def test_settings_are_kept_and_apply_to_the_conversations_turns(client) -> None:
    r = client.post("/conversations", json={"title": "Short", "settings": {"max_tokens": 3, "temperature": 0.2}})
    short = r.json()["id"]
    assert r.json()["settings"] == {"max_tokens": 3, "temperature": 0.2}

    reply = done(chat(client, "tell me a long story"))
    assert reply["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 3
    # A request's own override still wins over the conversation's setting.
    assert done(chat(client, "again", max_tokens=5))["usage"]["completion_tokens"] == 5

    # null removes a setting; a stored max_tokens above the server's limit is refused, naming the limit
    # (a stored setting clamped in silence would not be what the user sees in the form).
    r = client.patch(f"/conversations/{short}", json={"settings": {"max_tokens": None, "top_p": 0.5}})
    assert r.json()["settings"] == {"temperature": 0.2, "top_p": 0.5}
    r = client.patch(f"/conversations/{short}", json={"settings": {"max_tokens": 10**9}})
    assert r.status_code == 400 and f"at most {Settings().max_new_tokens}" in r.json()["message"]
    assert client.get("/conversations").json()["conversations"][0]["settings"] == {"temperature": 0.2, "top_p": 0.5}

    other = client.post("/conversations").json()["id"]
    assert done(chat(client, "tell me a long story", conversation_id=other))["usage"]["completion_tokens"] > 3


def test_the_system_prompt_setting_reaches_the_prompt_and_the_seed_callback(serve) -> None:
    prompts: list[str] = []
    chat_stream = ChatStream(use_mock_response=True, session_secret=SECRET, mock_token_delay=0.001)
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)

    @app.post("/seed_chat")
    async def seed_chat(request: Request):  # the seed API with its callback, as before
        async def callback(request: Request, message: str) -> None:
            prompts.append(request.state.session.get_session()["chat_prompt"].create_prompt())
        return await chat_stream.handle_chat_stream_request(request, callback=callback)

    with httpx.Client(base_url=serve(app).url) as c:
        c.post("/seed_chat", json={"user_input": "plain"})
        assert "You are a pirate" not in prompts[-1] and "plain" in prompts[-1]
        pirate = c.post("/conversations", json={"settings": {"system_prompt": "You are a pirate."}}).json()["id"]
        c.post("/seed_chat", json={"user_input": "ahoy"})
        assert "You are a pirate." in prompts[-1] and "plain" not in prompts[-1]
        c.post("/seed_chat", json={"user_input": "plain again", "conversation_id": pirate})
        assert "You are a pirate." in prompts[-1]


def test_conversations_are_bounded_per_session(client) -> None:
    for _ in range(book.MAX_CONVERSATIONS):
        assert client.post("/conversations").status_code == 201
    r = client.post("/conversations", json={"title": "one too many"})
    assert r.status_code == 409 and r.json()["error"] == "too_many_conversations"
    assert len(client.get("/conversations").json()["conversations"]) == book.MAX_CONVERSATIONS


def test_everything_survives_a_server_restart(server, tmp_path: Path) -> None:
    url = server()
    with httpx.Client(base_url=url) as c:
        chat(c, "before the restart")
        second = c.post("/conversations", json={"title": "Kept", "settings": {"top_p": 0.5}}).json()["id"]
        before = c.get("/conversations").json()
        cookies = dict(c.cookies)
    url = server()  # a new server on the same data folder (SQLite store and secret)
    with httpx.Client(base_url=url, cookies=cookies) as c:
        assert c.get("/conversations").json() == before
        assert before["current"] == second


def test_a_new_conversation_reaches_the_list_while_a_dead_process_holds_the_index_lock(server, tmp_path: Path) -> None:
    """Found in CI (test_ui): a turn saved its new conversation, but the index (the list) was locked
    past the 2 s an index change waits, so the list never got it and a reload showed nothing. Here
    another process took the session's index lock and died: its lease frees it after 5 s."""
    url = server(mock_token_delay=0.05)  # the reply takes about 1 s
    other_process = SQLiteSessionStore(tmp_path / "sessions.db")
    signer = TimestampSigner(SECRET, salt="chatstream.session")
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/chat_stream", json={"user_input": "hello there", "max_tokens": 20}) as r:
            session_id = signer.unsign(r.cookies["chatstream_session"]).decode()
            assert asyncio.run(other_process.acquire_lock(session_id, lease_s=5.0))
            events = parse_sse(r.read().decode())
        assert events[-1][0] == "done", events[-1]
        listed = c.get("/conversations").json()  # the old code: [] (the index was not updated)
        assert [(s["id"], s["title"]) for s in listed["conversations"]] == [(listed["current"], "hello there")]
        assert [m["content"] for m in c.get("/history").json()["messages"]][:1] == ["hello there"]
    asyncio.run(other_process.close())


def test_the_next_turn_goes_on_in_the_conversation_a_left_turn_was_saving(server, tmp_path: Path) -> None:
    """Issue 18 (test_chaos lost a completed turn from /history in 2 of 12 runs under load): a user's
    first turn, left mid-reply, was still saving the conversation it started when their next turn
    came; that one found no conversation yet and started a second, which the first one's save then
    hid (the first saved is the current one). Here another process holds the session's index lock
    for 1.5 s, so the left turn's save takes that long."""
    url = server(mock_token_delay=0.05)
    other_process = SQLiteSessionStore(tmp_path / "sessions.db")
    signer = TimestampSigner(SECRET, salt="chatstream.session")
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/chat_stream", json={"user_input": "first question", "max_tokens": 40}) as r:
            session_id = signer.unsign(r.cookies["chatstream_session"]).decode()
            assert asyncio.run(other_process.acquire_lock(session_id, lease_s=1.5))
            assert any(line.startswith("event: delta") for line in r.iter_lines())
        time.sleep(0.3)  # the server notices that the client left (it then saves what it sent)
        events = parse_sse(c.post("/chat_stream", json={"user_input": "second question", "max_tokens": 5}).text)
        assert events[-1][0] == "done", events[-1]
        listed = c.get("/conversations").json()
        assert len(listed["conversations"]) == 1, listed  # the old code: 2, and /history showed one of them
        history = c.get("/history").json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"], history
        assert [history[0]["content"], history[2]["content"]] == ["first question", "second question"]
    asyncio.run(other_process.close())


def test_a_session_from_before_several_conversations_is_migrated_on_read() -> None:
    old = {"chat_prompt": {"system": None, "messages": [{"role": "user", "content": "old question"},
                                                        {"role": "assistant", "content": "old answer"}]}}
    data = dict(old)
    conversations = book.migrate(data)
    assert list(conversations) == [book.LEGACY_ID]
    assert data["current"] == book.LEGACY_ID
    assert conversations[book.LEGACY_ID]["title"] == "old question"
    assert conversations[book.LEGACY_ID]["chat_prompt"] == old["chat_prompt"]
    assert "chat_prompt" not in data
    assert book.migrate(data) == conversations  # again: the same id, nothing new


def test_an_old_session_in_the_store_reads_and_continues(serve) -> None:
    store = MemorySessionStore()
    chat_stream = ChatStream(use_mock_response=True, session_secret=SECRET, mock_token_delay=0.001,
                             session_store=store)
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    # A session in the layout every earlier version wrote, and its signed cookie.
    session_id = "s" * 43
    asyncio.run(store.set(session_id, {"chat_prompt": {"system": None, "messages": [
        {"role": "user", "content": "old question"}, {"role": "assistant", "content": "old answer"}]}}, 3600))
    cookie = TimestampSigner(SECRET, salt="chatstream.session").sign(session_id).decode()
    with httpx.Client(base_url=serve(app).url, cookies={"chatstream_session": cookie}) as c:
        assert [m["content"] for m in c.get("/history").json()["messages"]] == ["old question", "old answer"]
        listed = c.get("/conversations").json()
        assert listed["current"] == book.LEGACY_ID and listed["conversations"][0]["title"] == "old question"
        chat(c, "new question")
        messages = c.get(f"/conversations/{book.LEGACY_ID}").json()["messages"]
        assert [m["content"] for m in messages][::2] == ["old question", "new question"]


def test_editing_a_sent_message_branches_the_conversation(client) -> None:
    chat(client, "first question")
    chat(client, "second question")
    chat(client, "third question")

    r = chat(client, "second, rephrased", edit_index=2)

    messages = client.get("/history").json()["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["first question", "second, rephrased"]
    assert len(messages) == 4 and messages[3]["content"].startswith("You said: second, rephrased")
    assert done(r)["status"] == "success"
    # The branch the edit replaced is kept on the new message, not lost.
    (branch,) = messages[2]["branches"]
    assert [m["content"] for m in branch if m["role"] == "user"] == ["second question", "third question"]
    for bad, status in (({"edit_index": 1}, 400), ({"edit_index": 99}, 400), ({"edit_index": -1}, 400),
                        ({"edit_index": "2"}, 400), ({"edit_index": 0, "regenerate": True}, 400)):
        r = client.post("/chat_stream", json={"user_input": "x", **bad})
        assert r.status_code == status and r.json()["error"] == "invalid_request", r.text
    assert client.get("/history").json()["messages"] == messages


def test_regenerate_keeps_earlier_answers_as_alternatives(client) -> None:
    # Seeds 0, 1 and 5 pick three different canned replies of the mock.
    first = chat(client, "pick a number", seed=0)
    client.post("/chat_stream", json={"regenerate": True, "seed": 1})
    client.post("/chat_stream", json={"regenerate": True, "seed": 5})
    messages = client.get("/history").json()["messages"]
    assert len(messages) == 2
    reply = messages[1]
    assert len(reply["alternatives"]) == 2
    assert reply["alternatives"][0] == "".join(d["text"] for e, d in parse_sse(first.text) if e == "delta")
    assert len({reply["content"], *reply["alternatives"]}) == 3
    # A regenerate that gives the very same answer adds no copy of it.
    client.post("/chat_stream", json={"regenerate": True, "seed": 5})
    assert client.get("/history").json()["messages"][1] == reply
    # The next turn goes on from the newest answer; earlier ones are kept for people, not sent to the model.
    chat(client, "and another")
    assert client.get("/history").json()["messages"][1] == reply


def test_selecting_an_earlier_answer_makes_the_conversation_go_on_from_it(client) -> None:
    chat(client, "pick a number", seed=0)
    client.post("/chat_stream", json={"regenerate": True, "seed": 1})
    client.post("/chat_stream", json={"regenerate": True, "seed": 5})
    conversation_id = client.get("/conversations").json()["current"]
    reply = client.get("/history").json()["messages"][1]
    first, second, third = [*reply["alternatives"], reply["content"]]

    r = client.patch(f"/conversations/{conversation_id}", json={"select": {"message": 1, "version": 0}})
    assert r.status_code == 200, r.text
    chosen = client.get("/history").json()["messages"][1]
    assert chosen == {"role": "assistant", "content": first, "alternatives": [second, third], "version": 0}

    # A regenerate that gives an answer already there uses it, without a copy.
    client.post("/chat_stream", json={"regenerate": True, "seed": 1})
    again = client.get("/history").json()["messages"][1]
    assert again == {"role": "assistant", "content": second, "alternatives": [first, third], "version": 1}

    for bad in ({"message": 0, "version": 1}, {"message": 1, "version": 9}, {"message": 5, "version": 0},
                {"message": "1", "version": 0}, {"message": 1}, [1, 0]):
        r = client.patch(f"/conversations/{conversation_id}", json={"select": bad})
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    assert client.get("/history").json()["messages"][1] == again
