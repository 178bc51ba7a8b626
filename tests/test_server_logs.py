"""The log of `chatstream serve` written to a file, as under systemd or Docker: timestamps on every line,
no progress-bar carriage returns, no line per static file or health probe, and one line per turn."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import parse_sse

CHATSTREAM = str(Path(sys.executable).with_name("chatstream"))
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def test_a_log_file_has_timestamps_no_progress_bars_no_routine_requests_and_a_line_per_turn(tmp_path):
    log_path = tmp_path / "chatstream.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [CHATSTREAM, "serve", "--port", "0", "--session-store", "memory://", "--data-dir", str(tmp_path),
             "--temperature", "0"],  # the embedded model: transformers draws a progress bar while it loads
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split("serving on ", 1)[1].split()[0]
        client = httpx.Client(base_url=url, timeout=120)  # the shared test machine can be slow
        deadline = time.monotonic() + 300
        while client.get("/health").status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert client.get("/").status_code == 200
        assert client.get("/static/chat.js").status_code == 200
        assert client.get("/static/no-such-file.js").status_code == 404
        r = client.post("/chat_stream", json={"user_input": "Hello", "max_tokens": 3})
        done = parse_sse(r.text)[-1][1]
        assert done["status"] == "success"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = log_path.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines if not line.startswith((" ", "Traceback"))), text
    assert '"GET / HTTP/1.1" 200' in text  # the page is a request worth a line
    assert "/static/chat.js" not in text and "GET /health" not in text
    assert '"GET /static/no-such-file.js HTTP/1.1" 404' in text  # a failed one still shows
    turns = [line for line in lines if " chatstream.turn: " in line]
    assert len(turns) == 1, text
    usage, timing = done["usage"], done["timing"]
    assert turns[0].split(" chatstream.turn: ", 1)[1] == (
        f"turn id={done['message_id'][:8]} face=chat_stream outcome=success finish=length "
        f"prompt_tokens={usage['prompt_tokens']} completion_tokens=3 tok_s={timing['tokens_per_s']} "
        f"queue_s={timing['queue_s']:.3f} ttft_s={timing['ttft_s']:.3f}"
    )
