"""A process that stalls longer than its connection timeouts (stopped, swapped out, its loop
blocked) still answers the requests that arrived meanwhile. Found by the soak (benchmarks/soak.py):
every request sent on a kept-alive connection to a process SIGSTOPped for 5 s got a connection
reset when it resumed, because the keep-alive timer ran before the waiting request was read.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
from test_cli import free_port, start, stop, wait_healthy

STALL_S = 2.5  # longer than both timeouts below


def test_requests_sent_during_a_stall_longer_than_the_timeouts_are_answered() -> None:
    port = free_port()
    proc = start(["--mock", "--port", str(port), "--session-store", "memory://", "--keep-alive-s", "1",
                  "--header-timeout-s", "1"])
    url = f"http://127.0.0.1:{port}"
    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(4)]
    try:
        wait_healthy(url, proc)
        for client in clients:  # each now holds a kept-alive connection
            assert client.get("/health").status_code == 200
        half_head = socket.create_connection(("127.0.0.1", port))
        half_head.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.2)  # the server has read the first half: its head timer runs
        proc.send_signal(signal.SIGSTOP)
        answers: list[object] = []

        def ask(client: httpx.Client) -> None:
            try:
                answers.append(client.get("/health").status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)

        threads = [threading.Thread(target=ask, args=(client,)) for client in clients]
        for thread in threads:
            thread.start()
        half_head.sendall(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")  # the rest of the head, in time
        time.sleep(STALL_S)
        proc.send_signal(signal.SIGCONT)
        for thread in threads:
            thread.join(timeout=30)
        half_head.settimeout(30)
        answer = b""
        while chunk := half_head.recv(65536):
            answer += chunk
        half_head.close()
        # The old code: ReadError (closed by the keep-alive timer) x4 and a 408 for the head.
        assert answers == [200] * 4
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        # The timeouts still work: an idle connection is closed, a silent one too.
        idle = socket.create_connection(("127.0.0.1", port))
        idle.settimeout(10)
        started = time.monotonic()
        assert idle.recv(1) == b""
        assert time.monotonic() - started < 5
        idle.close()
    finally:
        for client in clients:
            client.close()
        proc.send_signal(signal.SIGCONT)
        stop(proc)
