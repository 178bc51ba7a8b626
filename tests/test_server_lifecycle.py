"""`chatstream serve` across restarts and shutdowns: nothing a user wrote or was sent is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
from conftest import parse_sse
from test_cli import CHATSTREAM, free_port, start, stop, wait_healthy


def test_a_restart_on_default_settings_keeps_the_conversation(tmp_path):
    env = {"CHATSTREAM_DATA_DIR": str(tmp_path)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(["--mock", "--mock-token-delay", "0.001", "--port", str(port)], env=env)
    try:
        wait_healthy(url, proc)
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/chat_stream", json={"user_input": "remember me"})
            assert parse_sse(r.text)[-1][0] == "done"
            before = client.get("/history").json()["messages"]
            cookies = dict(client.cookies)
    finally:
        stop(proc)
    assert (tmp_path / "sessions.db").is_file()
    assert oct((tmp_path / "session_secret").stat().st_mode & 0o777) == "0o600"
    proc = start(["--mock", "--port", str(port)], env=env)
    try:
        wait_healthy(url, proc)
        with httpx.Client(base_url=url, cookies=cookies) as client:
            assert client.get("/history").json()["messages"] == before
    finally:
        stop(proc)
    assert [m["content"] for m in before][0] == "remember me"


def test_sigterm_mid_stream_ends_it_in_bounded_time_and_saves_the_partial_reply(tmp_path):
    env = {"CHATSTREAM_DATA_DIR": str(tmp_path)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(["--mock", "--mock-token-delay", "0.3", "--drain-timeout-s", "1", "--port", str(port)], env=env)
    try:
        wait_healthy(url, proc)
        client = httpx.Client(base_url=url, timeout=30)
        events = []
        with client.stream("POST", "/chat_stream", json={"user_input": "a long story please"}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 2:
                        break
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            text = "".join(e.get("text", "") for e in events)
            block = ""
            for line in lines:
                block += line + "\n"
        assert time.monotonic() - signalled < 8
        tail = parse_sse(block)
        assert tail[-1][0] == "error" and tail[-1][1]["error"] == "server_shutting_down"
        text += "".join(d.get("text", "") for e, d in tail if e == "delta")
        cookies = dict(client.cookies)
        client.close()
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = start(["--mock", "--port", str(port)], env=env)
    try:
        wait_healthy(url, proc)
        with httpx.Client(base_url=url, cookies=cookies) as client:
            history = client.get("/history").json()["messages"]
        assert history == [{"role": "user", "content": "a long story please"}, {"role": "assistant", "content": text}]
    finally:
        stop(proc)


def test_a_redis_store_without_a_shared_secret_refuses_to_start():
    proc = subprocess.run(
        [CHATSTREAM, "serve", "--mock", "--session-store", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if k != "CHATSTREAM_SESSION_SECRET"},
    )
    assert proc.returncode == 2
    assert "--session-secret" in proc.stderr


def test_a_bad_session_store_url_refuses_to_start():
    proc = subprocess.run([CHATSTREAM, "serve", "--mock", "--session-store", "postgres://x"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "accepted forms" in proc.stderr
