"""A really full disk: the SQLite sessions database on a 2 MiB tmpfs, filled by turns until the
disk (not a byte cap) refuses the next save. Deleting a conversation must still work there
(SQLite's write-ahead log needs room even for a delete), and free room for new turns.

Mounting needs root, which the tests have here and in CI (`.ci/run` runs `make test` as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import parse_sse


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 2 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _app(db_path: Path, max_input_chars: int = 100_000) -> object:
    from fastapi import FastAPI

    from chatstream import ChatStream
    from chatstream.session import SQLiteSessionStore

    chat_stream = ChatStream(use_mock_response=True, session_store=SQLiteSessionStore(db_path),
                             session_secret="test", max_input_chars=max_input_chars, context_len=1_000_000,
                             mock_token_delay=0.001)
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    return app



def _fill_disk(client: httpx.Client, text: str, attempts: int, turns_per_conversation: int) -> tuple[list[str], int]:
    """Turns of ``text`` (a new conversation every ``turns_per_conversation`` acknowledged turns) until
    the store refuses one with ``store_full``: the conversations made and the turns acknowledged."""
    conversation_ids: list[str] = []
    for acknowledged in range(attempts):  # every pass that does not return acknowledges one turn
        if acknowledged % turns_per_conversation == 0:
            created = client.post("/conversations", json={"title": f"c{len(conversation_ids)}"})
            if created.status_code != 201:
                assert created.status_code == 507 and created.json()["error"] == "store_full", created.text
                return conversation_ids, acknowledged
            conversation_ids.append(created.json()["id"])
        events = parse_sse(client.post("/chat_stream", json={"user_input": text}).text)
        if events[-1][0] != "done":
            assert events[-1][1]["error"] == "store_full", events[-1]
            return conversation_ids, acknowledged
    raise AssertionError("the disk never filled up")


def test_deleting_a_conversation_works_on_a_full_disk_and_frees_room(serve: object, small_disk: Path) -> None:
    url = serve(_app(small_disk / "sessions.db")).url  # type: ignore[operator]
    big = "x" * 20_000  # one word: the mock echoes it in one delta; two copies a turn
    with httpx.Client(base_url=url, timeout=30) as client:
        # 2 MiB holds a few dozen of these turns: the disk fills well within 60
        conversation_ids, acknowledged = _fill_disk(client, big, attempts=60, turns_per_conversation=5)
        # Full: less room than one rewrite of a conversation of five such turns (200 KB) needs.
        assert shutil.disk_usage(small_disk).free < 200_000, shutil.disk_usage(small_disk)
        assert acknowledged >= 5
        stored = sum(len(client.get(f"/conversations/{cid}").json()["messages"]) for cid in conversation_ids)
        assert stored == 2 * acknowledged  # every acknowledged turn is there, nothing more

        # The disk is full: deleting still works (it used to answer 507 store_full) ...
        first, second, *rest = conversation_ids
        for cid in (first, second):
            deleted = client.delete(f"/conversations/{cid}")
            assert deleted.status_code == 200, deleted.text
        listed = {c["id"] for c in client.get("/conversations").json()["conversations"]}
        assert listed == set(rest)
        # ... and frees room: new turns are stored again.
        created = client.post("/conversations", json={"title": "after the delete"})
        assert created.status_code == 201, created.text
        for _ in range(3):
            events = parse_sse(client.post("/chat_stream", json={"user_input": big}).text)
            assert events[-1][0] == "done", events[-1]
        assert len(client.get("/history").json()["messages"]) == 6
        # And once full again, a delete still works (the room a delete needs is kept for the next one).
        for _ in range(40):
            events = parse_sse(client.post("/chat_stream", json={"user_input": big}).text)
            if events[-1][0] != "done":
                assert events[-1][1]["error"] == "store_full", events[-1]
                break
        else:
            raise AssertionError("the disk never filled up again")
        deleted = client.delete(f"/conversations/{rest[0]}")
        assert deleted.status_code == 200, deleted.text
    assert os.path.exists(small_disk / "sessions.db")


def test_big_turns_never_leave_a_log_a_full_disk_cannot_checkpoint(serve: object, small_disk: Path) -> None:
    """Turns bigger than the reserve: a commit whose log the database could not take in on this
    disk (even with the reserve's room) is refused, so a delete still finds room afterwards."""
    url = serve(_app(small_disk / "sessions.db", max_input_chars=400_000)).url  # type: ignore[operator]
    big = "x" * 300_000  # 300 KB a message: more than half the 512 KiB reserve
    with httpx.Client(base_url=url, timeout=30) as client:
        conversation_ids, acknowledged = _fill_disk(client, big, attempts=20, turns_per_conversation=1)
        assert acknowledged >= 1
        stored = sum(len(client.get(f"/conversations/{cid}").json()["messages"]) for cid in conversation_ids)
        assert stored >= 2 * acknowledged  # every acknowledged turn is there
        for cid in conversation_ids:  # every delete works on the full disk, and frees room
            deleted = client.delete(f"/conversations/{cid}")
            assert deleted.status_code == 200, deleted.text
        assert client.get("/conversations").json()["conversations"] == []
        created = client.post("/conversations", json={"title": "after the deletes"})
        assert created.status_code == 201, created.text
        events = parse_sse(client.post("/chat_stream", json={"user_input": big}).text)
        assert events[-1][0] == "done", events[-1]
        assert len(client.get("/history").json()["messages"]) == 2
    assert os.path.exists(small_disk / "sessions.db")
