"""Chaos: many concurrent clients over raw sockets, a third hanging up at random moments.

Counted results are the assertions: 0 leaked slots (full concurrency available at once
afterwards), 0 lost or reordered turns, 0 text from another session, 0 5xx. Bounded in count and
time, loopback only.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field

from conftest import parse_sse, wait_until

from chatstream import Settings
from chatstream.engine.mock import _REPLIES
from chatstream.web.app import create_app

CLIENTS = 150
TURNS = 3
BURST = 100


@dataclass
class TurnRecord:
    text: str
    kind: str  # "completed", "mid_body" (left while sending), "hung" (left after sending)
    received: str = ""  # text deltas the client read before it left (all of them when completed)


@dataclass
class Client:
    name: str
    cookie: str | None = None
    turns: list[TurnRecord] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


def _request(port: int, path: str, body: bytes, cookie: str | None, method: str = "POST") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    if cookie:
        head += f"Cookie: chatstream_session={cookie}\r\n"
    return (head + "\r\n").encode() + body


def _parse_response(raw: bytes) -> tuple[int, dict[str, str], str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            out, rest = out + rest[:size], rest[size + 2:]
            if size == 0:
                break
        body = out
    return status, headers, body.decode("utf-8", errors="replace")


def _deltas(sse_text: str) -> tuple[str, bool]:
    """(text of complete delta events, whether a done event arrived)."""
    text, done = "", False
    for block in sse_text.split("\n\n")[:-1]:  # the last piece may be cut mid-event
        event = data = None
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        if event == "delta" and data:
            text += json.loads(data)["text"]
        done = done or event == "done"
    return text, done


async def _exchange(port: int, data: bytes, *, send_upto: int | None = None, read_upto: int | None = None,
                    close_after_send: bool = False) -> bytes:
    """Send ``data`` (or its first ``send_upto`` bytes) and read the answer; hang up early if asked.

    ``read_upto``: hang up once that many bytes of the reply's text events have arrived (queue
    positions do not count), i.e. somewhere mid-reply.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data if send_upto is None else data[:send_upto])
        await writer.drain()
        if send_upto is not None or close_after_send:
            await asyncio.sleep(random.random() * 0.02)
            return b""
        if read_upto is None:
            return await reader.read()
        raw = b""
        while chunk := await reader.read(256):
            raw += chunk
            first = raw.find(b"event: delta")
            if first >= 0 and len(raw) - first >= read_upto:
                break
        return raw
    finally:
        writer.transport.abort()  # a hang-up, not a polite close


async def _chat_turn(port: int, client: Client, text: str, rng: random.Random) -> None:
    data = _request(port, "/chat_stream", json.dumps({"user_input": text}).encode(), client.cookie)
    roll = rng.random()
    if roll < 1 / 9:  # leaves while still sending its body
        await _exchange(port, data, send_upto=len(data) - rng.randint(1, 10))
        client.turns.append(TurnRecord(text, "mid_body"))
        return
    for _attempt in range(200):
        if roll < 2 / 9:
            raw = await _exchange(port, data, close_after_send=True)
            kind = "hung"
        elif roll < 3 / 9:
            raw = await _exchange(port, data, read_upto=rng.randint(1, 1200))
            kind = "hung"
        else:
            raw = await _exchange(port, data)
            kind = "completed"
        if not raw:
            client.turns.append(TurnRecord(text, kind))
            return
        status, headers, body = _parse_response(raw)
        if status:
            client.statuses.append(status)
        if status == 409:  # its previous, abandoned turn is still being saved: retry, as a client would
            await asyncio.sleep(0.02)
            continue
        cookie = headers.get("set-cookie", "")
        if cookie.startswith("chatstream_session="):
            client.cookie = cookie.split(";")[0].split("=", 1)[1]
        received, done = _deltas(body)
        if kind == "completed":
            assert status == 200 and done, (status, body[:300])
        client.turns.append(TurnRecord(text, kind, received))
        return
    raise AssertionError("a session stayed busy for seconds")


def _check_history(client: Client, messages: list[dict[str, str]]) -> None:
    """The stored history is exactly what each turn's outcome allows, in order, with no foreign text."""
    i = 0
    for turn in client.turns:
        user = {"role": "user", "content": turn.text}
        if turn.kind == "completed":
            assert messages[i:i + 2] == [user, {"role": "assistant", "content": turn.received}], (client.name, i)
            i += 2
        elif turn.kind == "hung" and i < len(messages) and messages[i] == user:
            i += 1
            if i < len(messages) and messages[i]["role"] == "assistant":
                partial = messages[i]["content"]
                assert partial.startswith(turn.received), (client.name, partial, turn.received)
                assert any(f"You said: {turn.text}\n\n{reply}".startswith(partial) for reply in _REPLIES), partial
                i += 1
    assert i == len(messages), (client.name, messages[i:])


async def _history(port: int, cookie: str | None) -> list[dict[str, str]]:
    raw = await _exchange(port, _request(port, "/history", b"", cookie, method="GET"))
    status, _, body = _parse_response(raw)
    assert status == 200
    return json.loads(body)["messages"]


async def _burst_of_early_hangups(port: int) -> None:
    data = _request(port, "/chat_stream", json.dumps({"user_input": "gone"}).encode(), None)
    await asyncio.gather(*(_exchange(port, data, close_after_send=True) for _ in range(BURST)))


async def _run_clients(port: int, seed: int) -> list[Client]:
    rng = random.Random(seed)
    clients = [Client(f"c{i}") for i in range(CLIENTS)]

    async def run(client: Client) -> None:
        for turn in range(TURNS):
            await asyncio.sleep(rng.random() * 0.05)
            await _chat_turn(port, client, f"{client.name} turn {turn} {rng.random():.6f}", rng)

    await asyncio.gather(*(run(c) for c in clients), _burst_of_early_hangups(port))
    await _burst_of_early_hangups(port)
    return clients


def test_hundreds_of_clients_hanging_up_at_random_leak_nothing_and_lose_nothing(serve):
    settings = Settings(mock=True, mock_token_delay=0.002, concurrency=8, queue_size=1000,
                        session_secret="chaos", session_store="memory://", new_sessions_per_minute=0)
    app = create_app(settings)
    server = serve(app)
    port = int(server.url.rsplit(":", 1)[1])
    service = app.state.service

    clients = asyncio.run(asyncio.wait_for(_run_clients(port, seed=7), 120))

    # 0 leaked slots: nothing running or waiting, in admission or in the engine.
    assert wait_until(lambda: service.admission.running == 0 and service.admission.waiting == 0, timeout=10)
    assert wait_until(lambda: service.engine.num_running == 0, timeout=5)
    # 0 5xx (and no other error: 409 only while an abandoned turn was being saved).
    statuses = [s for c in clients for s in c.statuses]
    assert statuses and set(statuses) <= {200, 409}, sorted(set(statuses))
    # 0 lost or reordered turns, 0 cross-session text.
    for client in clients:
        _check_history(client, asyncio.run(_history(port, client.cookie)))
    kinds = [t.kind for c in clients for t in c.turns]
    assert kinds.count("completed") > CLIENTS and kinds.count("hung") > 20 and kinds.count("mid_body") > 10
    assert sum(1 for c in clients for t in c.turns if t.kind == "hung" and t.received) > 10  # left mid-reply

    # Full concurrency is available at once: 8 new turns all start without queueing.
    async def fresh_turns() -> list[str]:
        data = [_request(port, "/chat_stream", json.dumps({"user_input": f"after {i}"}).encode(), None)
                for i in range(settings.concurrency)]
        return [_parse_response(raw)[2] for raw in await asyncio.gather(*(_exchange(port, d) for d in data))]

    for body in asyncio.run(fresh_turns()):
        events = parse_sse(body)
        assert events[0][0] == "delta" and events[-1][0] == "done"


def test_real_model_clients_hanging_up_leak_nothing(serve, default_model):
    from chatstream import ChatService

    model, tokenizer = default_model
    settings = Settings(concurrency=4, queue_size=100, max_new_tokens=8, temperature=0.0,
                        session_secret="chaos", session_store="memory://", new_sessions_per_minute=0)
    service = ChatService(settings, model=model, tokenizer=tokenizer)
    app = create_app(settings, service)
    port = int(serve(app).url.rsplit(":", 1)[1])

    async def run() -> list[Client]:
        rng = random.Random(3)
        clients = [Client(f"r{i}") for i in range(10)]

        async def one(client: Client) -> None:
            for turn in range(2):
                data = _request(port, "/chat_stream", json.dumps({"user_input": f"{client.name} {turn}"}).encode(),
                                client.cookie)
                hang = rng.random() < 1 / 3
                for _attempt in range(200):  # 409 while its abandoned turn is still being saved: retry
                    raw = await _exchange(port, data, read_upto=rng.randint(1, 400) if hang else None)
                    status, headers, body = _parse_response(raw)
                    client.statuses.append(status)
                    if status != 409:
                        break
                    await asyncio.sleep(0.02)
                cookie = headers.get("set-cookie", "")
                if cookie.startswith("chatstream_session="):
                    client.cookie = cookie.split(";")[0].split("=", 1)[1]
                if not hang:
                    assert _deltas(body)[1], body[:200]

        await asyncio.gather(*(one(c) for c in clients))
        return clients

    clients = asyncio.run(asyncio.wait_for(run(), 240))
    assert wait_until(lambda: service.admission.running == 0 and service.admission.waiting == 0, timeout=20)
    assert wait_until(lambda: service.engine.num_running == 0 and service.engine.num_waiting == 0, timeout=10)
    assert set(s for c in clients for s in c.statuses) <= {200, 409}
