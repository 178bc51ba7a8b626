"""`chatstream serve` refuses settings it cannot work with at start: a message and exit code 2, never a
server that answers 503 forever, and never "serving on" for a port it could not take."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHATSTREAM = str(Path(sys.executable).with_name("chatstream"))


def serve(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run `chatstream serve`; a server that keeps running instead of exiting fails the test."""
    return subprocess.run([CHATSTREAM, "serve", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CHATSTREAM_SESSION_STORE": "memory://"})


@pytest.mark.parametrize("device, reason", [
    pytest.param("cuda", "CUDA is not available here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is usable")),
    ("cuda:99", "cuda:99"),
    ("meta", "chatstream runs on cpu or cuda"),
    ("gpu", "is not a device"),
])
def test_an_unusable_device_is_an_error_at_start(device, reason):
    proc = serve("--device", device, "--port", "0", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"chatstream: error: --device {device}") or f"--device '{device}'" in proc.stderr
    assert reason in proc.stderr
    assert "serving on" not in proc.stdout


def test_a_model_that_fails_to_load_stops_the_server(tmp_path):
    # It looks like a model folder (check_model passes), but transformers cannot load it.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    proc = serve("--model", str(tmp_path), "--port", "0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "chatstream: error: the model could not be loaded: " in proc.stderr
    assert "no-such-architecture" in proc.stderr


def test_a_port_in_use_is_an_error_before_the_model_loads():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = serve("--port", str(port), timeout=60)  # the embedded model: it would take seconds to load
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"chatstream: error: cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "serving on" not in proc.stdout
    assert "Converting" not in proc.stderr and "is ready" not in proc.stderr and "KV cache" not in proc.stderr


def test_port_0_serves_on_a_free_port_and_says_which():
    proc = subprocess.Popen([CHATSTREAM, "serve", "--mock", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "CHATSTREAM_SESSION_STORE": "memory://"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("chatstream: serving on http://127.0.0.1:")
        port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_proxy_address_that_is_not_one_is_an_error():
    proc = serve("--mock", "--forwarded-allow-ips", "127.0.0.1,my-proxy", timeout=60)
    assert proc.returncode == 2
    assert "--forwarded-allow-ips: not an address or network: 'my-proxy'" in proc.stderr
