"""Two `chatstream serve` processes sharing a real Redis and one secret: one service to the user."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from conftest import parse_sse, wait_until
from test_cli import free_port, start, stop, wait_healthy


@pytest.fixture
def two_servers(redis_server, tmp_path):
    env = {"CHATSTREAM_SESSION_STORE": redis_server, "CHATSTREAM_SESSION_SECRET": "shared-secret",
           "CHATSTREAM_DATA_DIR": str(tmp_path)}
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(start(["--mock", "--mock-token-delay", "0.1", "--port", str(port)], env=env))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc)
        yield urls, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)


def test_a_conversation_continues_on_whichever_process_answers(two_servers):
    (a, b), _ = two_servers
    with httpx.Client(base_url=a, timeout=30) as on_a:
        assert parse_sse(on_a.post("/chat_stream", json={"user_input": "asked on A"}).text)[-1][0] == "done"
        cookies = dict(on_a.cookies)
    with httpx.Client(base_url=b, timeout=30, cookies=cookies) as on_b:
        reply = parse_sse(on_b.post("/chat_stream", json={"user_input": "asked on B"}).text)
        assert reply[-1][0] == "done"
        contents = [m["content"] for m in on_b.get("/history").json()["messages"]]
    assert contents[0] == "asked on A" and contents[2] == "asked on B" and len(contents) == 4


def test_the_session_lock_holds_across_processes(two_servers):
    (a, b), _ = two_servers
    with httpx.Client(base_url=a, timeout=30) as on_a, httpx.Client(base_url=b, timeout=30) as on_b:
        on_a.post("/chat_stream", json={"user_input": "setup"})
        on_b.cookies.update(on_a.cookies)
        with on_a.stream("POST", "/chat_stream", json={"user_input": "a long reply"}) as r:
            lines = r.iter_lines()  # keep a reference: closing this iterator closes the connection
            next(line for line in lines if line.startswith("event: delta"))
            busy = on_b.post("/chat_stream", json={"user_input": "meanwhile on B"})
            assert busy.status_code == 409 and busy.json()["error"] == "session_busy"
            assert on_b.post("/clear_context").status_code == 409


def test_killing_a_process_mid_stream_keeps_what_was_streamed_and_frees_the_session(two_servers):
    (a, b), (proc_a, _) = two_servers
    with httpx.Client(base_url=a, timeout=30) as on_a:
        on_a.post("/chat_stream", json={"user_input": "setup"})
        cookies = dict(on_a.cookies)
        received = ""
        with on_a.stream("POST", "/chat_stream", json={"user_input": "tell me a long story"}) as r:
            lines = r.iter_lines()  # keep a reference: closing this iterator closes the connection
            for line in lines:
                if line.startswith("data:") and '"text"' in line:
                    received += json.loads(line[5:])["text"]
                    if len(received) > 20:
                        break
            def checkpointed() -> bool:  # a checkpoint (every 0.5 s) holds what was received, as B reads it
                with httpx.Client(base_url=b, timeout=30, cookies=cookies) as reader:
                    messages = reader.get("/history").json()["messages"]
                return len(messages) > 3 and messages[3]["content"].startswith(received)

            assert wait_until(checkpointed, timeout=20, interval=0.2)
            proc_a.send_signal(signal.SIGKILL)
            proc_a.wait(timeout=10)
    killed_at = time.monotonic()
    with httpx.Client(base_url=b, timeout=30, cookies=cookies) as on_b:
        messages = on_b.get("/history").json()["messages"]
        assert messages[2] == {"role": "user", "content": "tell me a long story"}
        assert messages[3]["role"] == "assistant" and messages[3]["content"].startswith(received)
        # The dead holder's lease runs out: the session is usable from B within seconds.
        statuses = []

        def next_turn_accepted() -> bool:
            r = on_b.post("/chat_stream", json={"user_input": "still there?"})
            statuses.append(r.status_code)
            return r.status_code == 200

        assert wait_until(next_turn_accepted, timeout=15, interval=0.5)
        assert time.monotonic() - killed_at < 10 and set(statuses) <= {200, 409}
        contents = [m["content"] for m in on_b.get("/history").json()["messages"]]
    assert contents[4] == "still there?" and len(contents) == 6
