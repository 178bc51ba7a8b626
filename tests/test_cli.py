"""`chatstream serve` as a user runs it: a real process on a real port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import parse_sse

CHATSTREAM = str(Path(sys.executable).with_name("chatstream"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [CHATSTREAM, "serve", *args], env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            r = httpx.get(f"{url}/health")
            if r.status_code == 200:
                return r
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became healthy")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    return out


def test_serve_mock_with_options_from_flags_and_environment():
    port = free_port()
    proc = start(["--mock", "--concurrency", "3"], env={"CHATSTREAM_PORT": str(port), "CHATSTREAM_QUEUE_SIZE": "7"})
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_healthy(url, proc).json()
        assert health["model"] == "mock"
        assert (health["concurrency"], health["queue_size"]) == (3, 7)
        r = httpx.post(f"{url}/chat_stream", json={"user_input": "ping"}, timeout=30)
        assert parse_sse(r.text)[-1][1]["status"] == "success"
    finally:
        stop(proc)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--port", "notaport"], "expected an integer"),
        (["--queue-size", "-1"], "--queue-size"),
        (["--kv-cache-mb", "0"], "--kv-cache-mb"),
        (["--kv-cache-dtype", "int4"], "--kv-cache-dtype"),
    ],
)
def test_bad_options_are_clear_errors(args, message):
    proc = subprocess.run([CHATSTREAM, "serve", "--mock", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bad_environment_value_is_a_clear_error():
    proc = subprocess.run(
        [CHATSTREAM, "serve", "--mock"], capture_output=True, text=True, timeout=30,
        env={**os.environ, "CHATSTREAM_CONCURRENCY": "lots"},
    )
    assert proc.returncode == 2
    assert "concurrency" in proc.stderr


@pytest.mark.parametrize("model", ["/typo.gguf", "nope/", "not_an_installed_package", "{tmp}/model.bin", "{tmp}"])
def test_serve_refuses_a_model_that_is_not_there(tmp_path, model):
    (tmp_path / "model.bin").write_bytes(b"x")
    model = model.format(tmp=tmp_path)
    proc = subprocess.run([CHATSTREAM, "serve", "--model", model, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2  # at once: not a server that answers 503 forever
    assert proc.stderr.startswith("chatstream: error: ")
    assert any(reason in proc.stderr for reason in ("No model at", "not a Hugging Face model folder", "neither a model folder"))


def test_a_model_can_be_named_by_its_installed_package():
    from chatstream.model_loader import DEFAULT_MODEL_PACKAGE, check_model, default_model_path, model_display_name

    expected = default_model_path()  # installed by `make setup`; its absence is a failure
    assert check_model(DEFAULT_MODEL_PACKAGE) == expected
    assert model_display_name(DEFAULT_MODEL_PACKAGE) == "SmolLM2-135M-Instruct"


def test_serve_the_embedded_model_health_then_chat():
    port = free_port()
    proc = start(["--port", str(port), "--max-new-tokens", "8", "--temperature", "0"])
    try:
        url = f"http://127.0.0.1:{port}"
        statuses = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None
            try:
                r = httpx.get(f"{url}/health")
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            statuses.add((r.status_code, r.json()["status"]))
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert statuses <= {(503, "loading"), (200, "ok")} and (200, "ok") in statuses
        r = httpx.post(f"{url}/chat_stream?format=text", json={"user_input": "Say hi"}, timeout=60)
        assert r.status_code == 200 and r.text.strip()
    finally:
        stop(proc)
