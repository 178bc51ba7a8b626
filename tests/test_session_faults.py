"""Faults where a turn meets the session store: stalled holders, crashes mid-regenerate, a store
that goes away or fills up. Real `chatstream serve` processes, real SQLite files, real Redis.

Every case counts what a user was told was done (201/200 answers, ``done`` events) and checks
that all of it is still there afterwards: 0 acknowledged changes lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import parse_sse, wait_until
from test_cli import free_port, start, stop, wait_healthy

LEASE_S = 1.0  # short, so a stall "longer than the lease" takes a second or two
LONG_INPUT = " ".join(f"w{i}" for i in range(120))  # the mock echoes it word by word: a long reply


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Any]:
    """``servers(n, store)`` starts ``n`` mock servers sharing ``store`` and one secret."""
    procs: list[subprocess.Popen] = []

    def launch(count: int, store: str, delay: str = "0.05") -> list[str]:
        env = {"CHATSTREAM_SESSION_STORE": store, "CHATSTREAM_SESSION_SECRET": "shared-secret",
               "CHATSTREAM_DATA_DIR": str(tmp_path), "CHATSTREAM_SESSION_LEASE_S": str(LEASE_S)}
        urls = []
        for _ in range(count):
            port = free_port()
            procs.append(start(["--mock", "--mock-token-delay", delay, "--port", str(port)], env=env))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs[-count:]):
            wait_healthy(url, proc)
        return urls

    launch.procs = procs  # type: ignore[attr-defined]
    try:
        yield launch
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                stop(proc)


def events_of(lines: Iterator[str]) -> list[tuple[str, dict]]:
    return parse_sse("\n".join(lines) + "\n")


def first_delta(lines: Iterator[str]) -> None:
    next(line for line in lines if line.startswith("event: delta"))


def stalled_holder_loses_nothing(a: str, b: str, stall: Any, resume: Any) -> None:
    """A streams a reply; A (or its store) stalls past the lease; B changes the session meanwhile."""
    with httpx.Client(base_url=a, timeout=30) as on_a, httpx.Client(base_url=b, timeout=30) as on_b:
        assert parse_sse(on_a.post("/chat_stream", json={"user_input": "setup"}).text)[-1][0] == "done"
        on_b.cookies.update(on_a.cookies)
        streaming_id = on_a.get("/conversations").json()["current"]
        with on_a.stream("POST", "/chat_stream", json={"user_input": LONG_INPUT}) as reply:
            lines = reply.iter_lines()
            first_delta(lines)
            stall()
            time.sleep(LEASE_S * 2)
            resume()
            acknowledged = []

            def b_creates() -> bool:  # B may have to wait for A's lease to run out
                r = on_b.post("/conversations", json={"title": "made on B"})
                if r.status_code == 201:
                    acknowledged.append(("created", r.json()["id"]))
                return r.status_code == 201

            assert wait_until(b_creates, timeout=10, interval=0.2)
            renamed = on_b.patch(f"/conversations/{streaming_id}", json={"title": "renamed on B"})
            assert renamed.status_code == 200, renamed.text
            events = events_of(lines)
        # A's reply stops with a clear error instead of overwriting B's changes, and never says done.
        assert [name for name, _ in events].count("done") == 0
        assert events[-1][0] == "error" and events[-1][1]["error"] == "lease_lost", events[-3:]
        time.sleep(LEASE_S)
        listed = {c["id"]: c["title"] for c in on_b.get("/conversations").json()["conversations"]}
    assert listed[acknowledged[0][1]] == "made on B"
    assert listed[streaming_id] == "renamed on B"


def test_a_stopped_process_cannot_overwrite_what_another_changed_meanwhile_sqlite(servers: Any, tmp_path: Path) -> None:
    a, b = servers(2, f"sqlite:///{tmp_path}/sessions.db")
    proc_a = servers.procs[0]
    stalled_holder_loses_nothing(a, b, lambda: proc_a.send_signal(signal.SIGSTOP),
                                 lambda: proc_a.send_signal(signal.SIGCONT))


def test_a_paused_redis_cannot_make_a_holder_overwrite_what_another_changed(servers: Any, redis_server: str) -> None:
    a, b = servers(2, f"{redis_server}?prefix=fence-{os.getpid()}-{time.monotonic_ns()}:")
    admin = redis.Redis.from_url(redis_server)
    try:
        stalled_holder_loses_nothing(a, b, lambda: admin.client_pause(int(LEASE_S * 2000)), lambda: None)
    finally:
        admin.client_unpause()
        admin.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_reply_whose_lease_ran_out_reads_as_stopped_and_is_counted(servers: Any, tmp_path: Path, kind: str,
                                                                     request: pytest.FixtureRequest) -> None:
    """A's reply is checkpointed, then A stalls past its lease: readers on B see that reply as
    stopped (nobody holds its conversation; on the old code it read "streaming" until the user's
    next turn), the list counts the messages stored, and what stays is the last checkpoint."""
    store = (f"sqlite:///{tmp_path}/sessions.db" if kind == "sqlite" else
             f"{request.getfixturevalue('redis_server')}?prefix=stopped-{os.getpid()}-{time.monotonic_ns()}:")
    a, b = servers(2, store)
    proc_a = servers.procs[0]
    with httpx.Client(base_url=a, timeout=30) as on_a, httpx.Client(base_url=b, timeout=30) as on_b:
        assert parse_sse(on_a.post("/chat_stream", json={"user_input": "setup"}).text)[-1][0] == "done"
        on_b.cookies.update(on_a.cookies)
        cid = on_a.get("/conversations").json()["current"]

        def read() -> tuple[list[dict], int]:
            """The conversation's messages and the list's count of them, as B reads them."""
            messages = on_b.get(f"/conversations/{cid}").json()["messages"]
            listed = {c["id"]: c["message_count"] for c in on_b.get("/conversations").json()["conversations"]}
            return messages, listed[cid]

        with on_a.stream("POST", "/chat_stream", json={"user_input": LONG_INPUT}) as reply:
            lines = reply.iter_lines()
            head = []  # up to the first delta's text
            while not (line := next(lines)).startswith("data: {\"text\""):
                head.append(line)
            head.append(line)
            seen: tuple[list[dict], int] = ([], 0)

            def checkpointed() -> bool:  # every 0.5 s (later on a busy machine)
                nonlocal seen
                seen = read()
                return len(seen[0]) == 4 and seen[0][3]["content"] != ""

            assert wait_until(checkpointed, timeout=20, interval=0.2), seen
            assert seen[0][3]["details"] == {"finish_reason": "streaming"}  # A holds it: still being written
            proc_a.send_signal(signal.SIGSTOP)
            try:
                time.sleep(LEASE_S * 2.5)
                stalled, count = read()
            finally:
                proc_a.send_signal(signal.SIGCONT)
            events = events_of(iter([*head, *lines]))
        assert events[-1][0] == "error" and events[-1][1]["error"] == "lease_lost", events[-3:]
        received = "".join(data["text"] for name, data in events if name == "delta")
        after, count_after = read()
    assert stalled[3]["details"] == {"finish_reason": "stopped"}
    assert count == len(stalled) == 4  # the list counts what is stored (the old code listed 2 until a commit)
    # What a lease_lost turn keeps: its question and its reply up to the last checkpoint written
    # while the lease held (part of what the client was sent), shown as stopped; nothing after.
    assert after == stalled and count_after == 4
    assert after[2]["content"] == LONG_INPUT and received.startswith(after[3]["content"])


def test_the_ui_shows_a_reply_whose_lease_ran_out_as_stopped(servers: Any, tmp_path: Path, browser: Any) -> None:
    """The same stall, read by the browser UI on B: the reply A can no longer write is shown as
    stopped (the old code showed "Still being written" until the user's next turn)."""
    from playwright.sync_api import expect

    a, b = servers(2, f"sqlite:///{tmp_path}/sessions.db")
    proc_a = servers.procs[0]
    with httpx.Client(base_url=a, timeout=30) as on_a, httpx.Client(base_url=b, timeout=30) as on_b:
        assert parse_sse(on_a.post("/chat_stream", json={"user_input": "setup"}).text)[-1][0] == "done"
        on_b.cookies.update(on_a.cookies)
        with on_a.stream("POST", "/chat_stream", json={"user_input": LONG_INPUT}) as reply:
            lines = reply.iter_lines()
            first_delta(lines)
            assert wait_until(lambda: len(on_b.get("/history").json()["messages"]) == 4, timeout=20, interval=0.2)
            proc_a.send_signal(signal.SIGSTOP)
            context = browser.new_context()
            try:
                time.sleep(LEASE_S * 2.5)
                context.add_cookies([{"name": name, "value": value, "url": b} for name, value in on_a.cookies.items()])
                page = context.new_page()
                page.goto(b + "/")
                replies = page.locator(".msg-assistant")
                expect(replies).to_have_count(2)
                expect(replies.last.locator(".note")).to_have_text("Stopped · the reply is incomplete", timeout=5_000)
                expect(replies.last).to_have_class(re.compile(r"\bincomplete\b"))
            finally:
                context.close()
                proc_a.send_signal(signal.SIGCONT)
            assert events_of(lines)[-1][1]["error"] == "lease_lost"


# -- regenerate: earlier answers are stored before the new one streams -------------------------------

def versions(message: dict) -> list[str]:
    alternatives = list(message.get("alternatives") or [])
    version = message.get("version", len(alternatives))
    return alternatives[:version] + [message["content"]] + alternatives[version:]


def test_killing_the_server_mid_regenerate_keeps_every_earlier_answer(servers: Any, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/sessions.db"
    (url,) = servers(1, store, delay="0.1")
    with httpx.Client(base_url=url, timeout=30) as client:
        for n, regenerate in ((4, False), (5, True), (6, True)):  # three different answers to one question
            r = client.post("/chat_stream", json={"user_input": LONG_INPUT, "regenerate": regenerate, "max_tokens": n})
            assert parse_sse(r.text)[-1][0] == "done"
        earlier = versions(client.get("/history").json()["messages"][-1])
        assert len(set(earlier)) == 3
        with client.stream("POST", "/chat_stream", json={"user_input": "", "regenerate": True}) as reply:
            lines = reply.iter_lines()
            first_delta(lines)
            during: dict = {}

            def checkpointed() -> bool:  # a checkpoint of the new answer (every 0.5 s; later on a busy machine)
                nonlocal during
                with httpx.Client(base_url=url, timeout=30, cookies=dict(client.cookies)) as reader:
                    during = reader.get("/history").json()["messages"][-1]
                return len(versions(during)) == 4

            assert wait_until(checkpointed, timeout=20, interval=0.2), during
            assert set(earlier) <= set(versions(during)), during
            servers.procs[0].send_signal(signal.SIGKILL)
            servers.procs[0].wait(timeout=10)
        cookies = dict(client.cookies)
    (url,) = servers(1, store)
    time.sleep(LEASE_S)
    with httpx.Client(base_url=url, timeout=30, cookies=cookies) as client:
        after = client.get("/history").json()["messages"][-1]
    assert set(earlier) <= set(versions(after)), after
    assert len(versions(after)) == 4  # and the part of the new answer saved before the kill


def test_killing_the_server_mid_edit_keeps_the_branch_it_replaces(servers: Any, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/sessions.db"
    (url,) = servers(1, store, delay="0.1")
    with httpx.Client(base_url=url, timeout=30) as client:
        for text in ("first question", "second question"):
            r = client.post("/chat_stream", json={"user_input": text, "max_tokens": 3})
            assert parse_sse(r.text)[-1][0] == "done"
        before = client.get("/history").json()["messages"]
        with client.stream("POST", "/chat_stream", json={"user_input": LONG_INPUT, "edit_index": 0}) as reply:
            first_delta(reply.iter_lines())

            def checkpointed() -> bool:  # a checkpoint of the new branch's reply (every 0.5 s; later when busy)
                with httpx.Client(base_url=url, timeout=30, cookies=dict(client.cookies)) as reader:
                    messages = reader.get("/history").json()["messages"]
                return len(messages) > 1 and messages[0]["content"] == LONG_INPUT

            assert wait_until(checkpointed, timeout=20, interval=0.2)
            servers.procs[0].send_signal(signal.SIGKILL)
            servers.procs[0].wait(timeout=10)
        cookies = dict(client.cookies)
    (url,) = servers(1, store)
    with httpx.Client(base_url=url, timeout=30, cookies=cookies) as client:
        after = client.get("/history").json()["messages"]
    assert after[0]["content"] == LONG_INPUT and after[1]["content"].startswith("You")  # what it was sent
    def texts(messages: list[dict]) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in messages]

    assert [texts(branch) for branch in after[0]["branches"]] == [texts(before)]  # the whole replaced branch


# -- the store goes away, or fills up ------------------------------------------------------------------

@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own, which the test may kill and start again on the same port."""
    port = free_port()
    procs: list[subprocess.Popen] = []

    def launch() -> None:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client = redis.Redis(port=port)
        assert wait_until(lambda: _pings(client), timeout=10)
        client.close()

    def kill() -> None:
        procs[-1].kill()
        procs[-1].wait(timeout=10)

    launch()
    try:
        yield f"redis://127.0.0.1:{port}/0", kill, launch
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_redis_killed_mid_stream_is_an_error_then_503_until_it_is_back(servers: Any, own_redis: Any) -> None:
    store, kill, restart = own_redis
    (url,) = servers(1, store)
    with httpx.Client(base_url=url, timeout=30) as client:
        assert parse_sse(client.post("/chat_stream", json={"user_input": "setup"}).text)[-1][0] == "done"
        with client.stream("POST", "/chat_stream", json={"user_input": LONG_INPUT}) as reply:
            lines = reply.iter_lines()
            first_delta(lines)
            kill()
            events = events_of(lines)
        names = [name for name, _ in events]
        assert "done" not in names and names[-1] == "error", events[-3:]
        assert events[-1][1]["error"] == "store_unavailable", events[-1]
        # While the store is down: 503 with Retry-After everywhere, never 500; /health is not ready.
        for method, path, body in (("POST", "/chat_stream", {"user_input": "hello?"}), ("GET", "/conversations", None),
                                   ("POST", "/conversations", {}), ("GET", "/history", None)):
            r = client.request(method, path, json=body)
            assert r.status_code == 503 and r.json()["error"] == "store_unavailable", (path, r.status_code, r.text)
            assert int(r.headers["retry-after"]) > 0
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "store_unavailable"
        # Back without restarting chatstream.
        restart()
        assert wait_until(lambda: client.get("/health").status_code == 200, timeout=10, interval=0.2)
        again = parse_sse(client.post("/chat_stream", json={"user_input": "back?"}).text)
        assert again[-1][0] == "done"


def test_a_full_store_ends_the_turn_with_an_error_and_deleting_frees_it(serve: Any, tmp_path: Path) -> None:
    from fastapi import FastAPI

    from chatstream import ChatStream
    from chatstream.session import SQLiteSessionStore

    store = SQLiteSessionStore(tmp_path / "sessions.db", max_bytes=256 * 1024)
    chat_stream = ChatStream(use_mock_response=True, session_store=store, session_secret="test",
                             max_input_chars=100_000, context_len=1_000_000, mock_token_delay=0.001)
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    url = serve(app).url
    big = "x" * 30_000  # one word: the mock echoes it in one delta
    with httpx.Client(base_url=url, timeout=30) as client:
        first = client.post("/conversations", json={"title": "the big one"}).json()["id"]
        acknowledged = 0
        for _ in range(50):
            events = parse_sse(client.post("/chat_stream", json={"user_input": big}).text)
            names = [name for name, _ in events]
            if names[-1] == "done":
                acknowledged += 1
                continue
            # The turn whose save failed says so, and never says done.
            assert "done" not in names and events[-1][1]["error"] == "store_full", events[-1]
            break
        else:
            raise AssertionError("the store never filled up")
        assert acknowledged >= 1
        assert len(client.get("/history").json()["messages"]) == 2 * acknowledged  # every acknowledged turn kept
        still_full = parse_sse(client.post("/chat_stream", json={"user_input": big}).text)
        assert still_full[-1][1]["error"] == "store_full"
        assert client.get("/conversations").status_code == 200  # reads still work
        deleted = client.delete(f"/conversations/{first}")  # a delete needs no room
        assert deleted.status_code == 200, deleted.text
        client.post("/conversations", json={"title": "after the delete"})
        again = parse_sse(client.post("/chat_stream", json={"user_input": big}).text)
        assert again[-1][0] == "done"
        assert [m["content"][:1] for m in client.get("/history").json()["messages"]] == ["x", "Y"]


def test_the_parallel_reply_limit_of_a_session_holds_across_processes(servers: Any, tmp_path: Path) -> None:
    a, b = servers(2, f"sqlite:///{tmp_path / 'sessions.db'}")
    with httpx.Client(base_url=a, timeout=30) as on_a, httpx.Client(base_url=b, timeout=30) as on_b, \
            contextlib.ExitStack() as streams:
        ids = [on_a.post("/conversations", json={"title": f"c{n}"}).json()["id"] for n in range(6)]
        on_b.cookies.update(on_a.cookies)
        readers = []  # kept: a reader dropped closes its stream (a client that left)
        for n in range(4):  # two replies streaming in each process: four for this user
            client = (on_a, on_b)[n % 2]
            reply = streams.enter_context(client.stream("POST", "/chat_stream", json={
                "user_input": LONG_INPUT, "conversation_id": ids[n]}))
            assert reply.status_code == 200
            readers.append(reply.iter_lines())
            first_delta(readers[-1])
        for client, conversation in ((on_a, ids[4]), (on_b, ids[5])):  # a fifth, in either process, is refused
            refused = client.post("/chat_stream", json={"user_input": "one more", "conversation_id": conversation})
            assert refused.status_code == 409, refused.text[:300]
            assert refused.json()["error"] == "session_busy" and "4 replies" in refused.json()["message"]
        other = httpx.post(f"{b}/chat_stream", json={"user_input": "another user"}, timeout=30)
        assert parse_sse(other.text)[-1][0] == "done"  # other users are not limited by it
        assert all(events_of(reader)[-1][0] == "done" for reader in readers)
