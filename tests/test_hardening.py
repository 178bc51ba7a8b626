"""Regression tests for the defects found by attacking chatstream as users and attackers would.

Each test names the defect it pins down. They run the real server (``create_app``, the app that
``chatstream serve`` runs) on a loopback port, on the mock engine unless the model matters.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import parse_sse, wait_until
from fastapi import FastAPI

from chatstream import ChatService, ChatStream, Settings
from chatstream.engine import GenerationOutput, SamplingParams
from chatstream.engine.mock import MockEngine, MockTokenizer
from chatstream.engine.stream import RequestStream
from chatstream.session import MemorySessionStore
from chatstream.web.app import create_app

USER = [{"role": "user", "content": "hello"}]


def mock_app(**settings: Any) -> Any:
    options = {"mock": True, "mock_token_delay": 0.001, "session_secret": "test-secret",
               "session_store": "memory://", **settings}
    return create_app(Settings(**options))


def chat(client: httpx.Client, text: str = "Hello", **extra: Any) -> httpx.Response:
    return client.post("/chat_stream", json={"user_input": text, **extra})


def history(client: httpx.Client) -> list[dict[str, str]]:
    return client.get("/history").json()["messages"]


def raw_request(port: int, data: bytes, read: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- 1. every stream ends; a turn never outlives a silent engine --------------------------------

async def test_mock_engine_request_cancelled_before_its_first_step_still_ends():
    engine = MockEngine(token_delay=0.01)
    streams = [engine.generate([1, 2, 3], SamplingParams(max_new_tokens=5)) for _ in range(20)]
    for stream in streams:
        stream.cancel()  # before the engine's task ever ran
    finals = [await asyncio.wait_for(_last(stream), 2) for stream in streams]
    assert all(f.finished and f.finish_reason == "cancelled" for f in finals)
    assert engine.num_running == 0


async def _last(stream: RequestStream) -> GenerationOutput:
    outputs = [output async for output in stream]
    assert outputs
    return outputs[-1]


class SilentEngine:
    """A third-party engine that accepts requests and never answers (a hung GPU, a dead upstream)."""

    ready = True

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, prompt_token_ids: Any, params: SamplingParams, request_id: str | None = None,
                 **_: Any) -> RequestStream:
        return RequestStream(asyncio.get_running_loop(), self.cancelled.append, request_id)


def test_a_silent_engine_ends_the_turn_at_the_deadline_and_frees_the_slot(serve):
    engine = SilentEngine()
    settings = Settings(session_secret="s", session_store="memory://", stall_timeout_s=0.5, concurrency=1)
    service = ChatService(settings, engine=engine, tokenizer=MockTokenizer())
    app = create_app(settings, service)
    url = serve(app).url
    with httpx.Client(base_url=url, timeout=30) as client:
        started = time.monotonic()
        r = chat(client, "anyone there?")
        assert time.monotonic() - started < 10
        assert parse_sse(r.text)[-1] == ("error", {"error": "engine_timeout",
                                                   "message": "the model produced nothing for 0.5 s"})
        assert service.admission.running == 0 and len(engine.cancelled) == 1
        assert history(client) == [{"role": "user", "content": "anyone there?"}]  # nothing lost
        # The slot is free: the next turn is admitted at once (and times out the same way).
        assert parse_sse(chat(client, "again").text)[0][0] == "error"


def test_liveness_reports_a_stalled_engine_until_it_answers_again(serve):
    engine = SilentEngine()
    settings = Settings(session_secret="s", session_store="memory://", stall_timeout_s=0.3, concurrency=1)
    service = ChatService(settings, engine=engine, tokenizer=MockTokenizer())
    url = serve(create_app(settings, service)).url
    assert httpx.get(f"{url}/health/live").status_code == 200
    assert parse_sse(httpx.post(f"{url}/chat_stream", json={"user_input": "x"}, timeout=30).text)[-1][0] == "error"
    r = httpx.get(f"{url}/health/live")
    assert r.status_code == 503 and r.json() == {"live": False}
    assert httpx.get(f"{url}/health").json()["live"] is False
    service.engine = MockEngine(token_delay=0.001)  # the engine answers again (e.g. the GPU recovered)
    assert parse_sse(httpx.post(f"{url}/chat_stream", json={"user_input": "y"}, timeout=30).text)[-1][0] == "done"
    assert httpx.get(f"{url}/health/live").status_code == 200


def test_a_burst_of_clients_hanging_up_at_once_leaks_no_slot(serve):
    app = mock_app(concurrency=4, queue_size=200, mock_token_delay=0.01)
    url = serve(app).url
    port = port_of(url)
    body = json.dumps({"user_input": "bye"}).encode()
    request = (b"POST /chat_stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    threads = [threading.Thread(target=raw_request, args=(port, request, False)) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service = app.state.service
    assert wait_until(lambda: service.admission.running == 0 and service.admission.waiting == 0, timeout=10)
    assert wait_until(lambda: service.engine.num_running == 0, timeout=5)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


# -- 3. huge /v1 bodies never stall the event loop -----------------------------------------------

def test_too_many_messages_are_refused_without_stalling_the_loop(serve):
    url = serve(mock_app()).url
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 100_000}).encode()
    lags: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            httpx.get(f"{url}/health", timeout=30)
            lags.append(time.monotonic() - started)

    def flood(results: list[int]) -> None:
        results.append(httpx.post(f"{url}/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"}, timeout=60).status_code)

    statuses: list[int] = []
    prober = threading.Thread(target=probe)
    prober.start()
    floods = [threading.Thread(target=flood, args=(statuses,)) for _ in range(8)]
    for t in floods:
        t.start()
    for t in floods:
        t.join()
    done.set()
    prober.join()
    assert statuses == [400] * 8
    assert max(lags) < 2.0  # was 9.7 s of stall before the message cap and off-loop parsing


def test_too_many_messages_answer_names_the_limit(serve):
    url = serve(mock_app(max_messages=10)).url
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER * 11})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "too_many_messages" and "at most 10" in r.json()["error"]["message"]


# -- 4, 5, 12. bodies: never a 500, bounded, JSON only ------------------------------------------

@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,
    b'{"user_input": "hi", "seed": ' + b"7" * 5000 + b"}",
    b'{"user_input": "\\ud800"}',
    b'{"user_input": "hi", "temperature": NaN}',
    b'\xff\xfe{"user_input": "hi"}',
])
def test_hostile_chat_stream_bodies_are_400_and_change_nothing(serve, body):
    url = serve(mock_app()).url
    with httpx.Client(base_url=url) as client:
        chat(client, "keep me")
        before = history(client)
        r = client.post("/chat_stream", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_request"
        assert history(client) == before


def test_an_absurd_declared_length_is_413_at_once(serve):
    url = serve(mock_app()).url
    started = time.monotonic()
    answer = raw_request(port_of(url), b"POST /chat_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 1000000000000000000\r\n\r\n{", timeout=5)
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 3


def test_a_streamed_body_over_the_limit_is_413(serve):
    url = serve(mock_app(max_body_bytes=64 * 1024)).url

    def chunks():
        for _ in range(100):
            yield b"x" * 4096

    r = httpx.post(f"{url}/chat_stream", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"


def test_the_seed_endpoint_in_a_users_own_app_bounds_its_body_too(serve):
    from seed_apps import basic_app

    from chatstream import ChatStream

    url = serve(basic_app(ChatStream(use_mock_response=True, session_secret="s"))).url  # no guards installed
    answer = raw_request(port_of(url), b"POST /chat_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 1000000000000000000\r\n\r\n{", timeout=5)
    assert answer.startswith(b"HTTP/1.1 413")

    def chunks():
        for _ in range(1100):
            yield b"x" * 4096

    r = httpx.post(f"{url}/chat_stream", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"


def test_the_conversation_routes_in_a_users_own_app_bound_their_bodies(serve):
    from fastapi import FastAPI

    from chatstream import ChatStream

    chat_stream = ChatStream(use_mock_response=True, session_secret="s")
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)  # no body-limit middleware in this app

    def chunks():
        for _ in range(1100):
            yield b"x" * 4096

    r = httpx.post(f"{serve(app).url}/conversations", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "input_too_large"


def test_chat_stream_requires_json_and_a_same_origin_for_cookie_posts(serve):
    url = serve(mock_app()).url
    with httpx.Client(base_url=url) as client:
        chat(client, "mine")
        r = client.post("/chat_stream", content=b"user_input=hi", headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        r = client.post("/chat_stream", json={"user_input": "csrf"}, headers={"origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden_origin"
        r = client.post("/clear_context", headers={"origin": "https://evil.example"})
        assert r.status_code == 403
        assert [m["content"] for m in history(client)][0] == "mine"
        r = client.post("/chat_stream", json={"user_input": "same origin"}, headers={"origin": url})
        assert r.status_code == 200


def test_text_plain_with_q_zero_is_not_chosen(serve):
    url = serve(mock_app()).url
    r = httpx.post(f"{url}/chat_stream", json={"user_input": "hi"}, headers={"accept": "text/plain;q=0, */*"})
    assert r.headers["content-type"].startswith("text/event-stream")


# -- 6. floods of new sessions never evict a real user's history ------------------------------

def test_a_cookieless_flood_creates_no_sessions_and_evicts_nobody(serve):
    from chatstream.session import MemorySessionStore

    store = MemorySessionStore(max_sessions=50)
    settings = Settings(mock=True, mock_token_delay=0.001, session_secret="s", new_sessions_per_minute=5)
    app = create_app(settings, ChatService(settings, session_store=store))
    url = serve(app).url
    with httpx.Client(base_url=url) as user:
        chat(user, "my precious history")
        with httpx.Client(base_url=url) as flood:
            for _ in range(300):  # requests that change nothing create nothing
                assert flood.post("/clear_context").status_code == 200
                assert flood.get("/history").json() == {"messages": []}
                flood.cookies.clear()
        statuses = []
        for _ in range(10):  # a chat turn needs a session: new ones are rate-limited per client
            with httpx.Client(base_url=url) as newcomer:
                statuses.append(chat(newcomer, "hi").status_code)
        assert statuses.count(429) >= 5 and set(statuses) <= {200, 429}
        assert history(user)[0]["content"] == "my precious history"


# -- 7. a long stored history neither grows without bound nor makes turns slow ----------------

def test_a_conversation_is_bounded_and_the_bound_is_a_clear_error(serve):
    url = serve(mock_app(max_history_messages=6)).url
    with httpx.Client(base_url=url) as client:
        for i in range(3):
            assert parse_sse(chat(client, f"turn {i}").text)[-1][0] == "done"
        r = chat(client, "one too many")
        assert r.status_code == 413 and r.json()["error"] == "conversation_too_long"
        assert len(history(client)) == 6
        assert client.post("/clear_context").status_code == 200
        assert parse_sse(chat(client, "fresh start").text)[-1][0] == "done"


def test_rendering_cost_is_bounded_by_the_context_not_the_history():
    from transformers import AutoTokenizer

    from chatstream import ChatPrompt
    from chatstream.model_loader import resolve_model_folder

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(), local_files_only=True)
    encoded: list[int] = []
    encode = tokenizer.encode

    def counting_encode(text: str, **kwargs: Any) -> Any:
        encoded.append(len(text))
        return encode(text, **kwargs)

    prompt = ChatPrompt(tokenizer=tokenizer)
    for i in range(400):
        prompt.add_requester_msg(f"question {i}: " + "lorem ipsum " * 30)
        prompt.add_responder_msg(f"answer {i}: " + "dolor sit amet " * 30)
    prompt.add_requester_msg("the newest question")
    history_chars = sum(len(m["content"]) for m in prompt.messages)
    tokenizer.encode = counting_encode  # type: ignore[method-assign]
    ids = prompt.render_ids(900)
    assert len(ids) <= 900 and "the newest question" in tokenizer.decode(ids)
    assert sum(encoded) < history_chars / 20  # ~ what fits the context, not the 400 turns
    # The next turn starts the prompt at the same place, so the engine's prefix cache hits.
    start = prompt.context_start
    prompt.add_responder_msg("short answer")
    prompt.add_requester_msg("one more")
    again = prompt.render_ids(900)
    assert prompt.context_start == start and again[: len(ids) - 8] == ids[: len(ids) - 8]


# -- 8. one key protects every route ----------------------------------------------------------

def test_the_api_key_protects_every_route_but_the_health_probes(serve):
    url = serve(mock_app(api_key="s3cret-key")).url
    with httpx.Client(base_url=url) as anonymous:
        for method, path in (("POST", "/chat_stream"), ("GET", "/history"), ("POST", "/clear_context"),
                             ("GET", "/stats/loop_lag"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = anonymous.request(method, path, json={"user_input": "hi"})
            assert r.status_code == 401, path
        assert anonymous.get("/", headers={"accept": "text/html"}).status_code in (303, 307)
        assert anonymous.get("/health").status_code == 200
        # A liveness probe carries no key: a 401 there would make the orchestrator restart the process.
        live = anonymous.get("/health/live")
        assert live.status_code == 200 and live.json()["live"] is True
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/docs").status_code in (401, 404)
    with httpx.Client(base_url=url, headers={"authorization": "Bearer s3cret-key"}) as client:
        assert parse_sse(chat(client, "let me in").text)[-1][0] == "done"
        assert client.get("/history").json()["messages"][0]["content"] == "let me in"


# -- 11. a client that leaves frees its session at once, and keeps exactly what it was sent ----

def test_leaving_mid_stream_releases_the_session_at_once_and_saves_what_was_sent(serve):
    app = mock_app(mock_token_delay=0.1)
    url = serve(app).url
    with httpx.Client(base_url=url, timeout=30) as client:
        chat(client, "setup")  # the session exists
        received = ""
        with client.stream("POST", "/chat_stream", json={"user_input": "tell me everything"}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"text"' in line:
                    received += json.loads(line[5:])["text"]
                    if len(received) > 15:
                        break
        # No 409 window: the very next turn of this session is accepted.
        r = chat(client, "next question")
        assert r.status_code == 200
        messages = history(client)
    partial = messages[3]["content"]
    assert messages[2]["content"] == "tell me everything"
    assert partial.startswith(received) and len(partial) - len(received) < 12  # at most the piece in flight
    assert messages[4]["content"] == "next question"


class SlowSavingStore(MemorySessionStore):
    """A store whose message writes take 0.5 s, as a busy machine's can: a turn whose client left is
    still saving when that client's next turn arrives (CI saw the 409 this produced)."""

    async def set_messages(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.5)
        await super().set_messages(*args, **kwargs)


def test_the_next_turn_waits_for_the_left_turn_to_save_instead_of_409(serve):
    chat_stream = ChatStream(use_mock_response=True, session_store=SlowSavingStore(), session_secret="test",
                             mock_token_delay=0.1)
    app = FastAPI()
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    url = serve(app).url
    with httpx.Client(base_url=url, timeout=30) as client:
        chat(client, "setup")
        for n in range(2):
            with client.stream("POST", "/chat_stream", json={"user_input": f"tell me everything {n}"}) as r:
                next(line for line in r.iter_lines() if line.startswith("data:") and '"text"' in line)
            r = chat(client, f"next question {n}")  # the old code: 409 session_busy
            assert r.status_code == 200, r.text
        contents = [m["content"] for m in history(client)]
    assert contents[2::4] == ["tell me everything 0", "tell me everything 1"]
    assert contents[4::4] == ["next question 0", "next question 1"]


def test_clearing_rotates_the_session_id(serve):
    url = serve(mock_app()).url
    with httpx.Client(base_url=url) as client:
        chat(client, "before")
        old = client.cookies["chatstream_session"]
        r = client.post("/clear_context")
        assert r.status_code == 200 and "chatstream_session=" in r.headers["set-cookie"]
        assert client.cookies["chatstream_session"] != old
    with httpx.Client(base_url=url, cookies={"chatstream_session": old}) as stale:
        assert history(stale) == []


# -- 13. smaller ones ------------------------------------------------------------------------

def test_a_request_waiting_too_long_in_the_queue_ends_with_queue_timeout(serve):
    app = mock_app(concurrency=1, queue_size=2, mock_token_delay=0.2, queue_timeout_s=0.3)
    url = serve(app).url
    results: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: results.update(first=httpx.post(
        f"{url}/chat_stream", json={"user_input": "a long one"}, timeout=30)))
    t.start()
    assert wait_until(lambda: app.state.service.admission.running == 1)
    with httpx.Client(base_url=url, timeout=30) as client:
        events = parse_sse(chat(client, "me next").text)
        assert events[0] == ("queued", {"position": 1})
        assert events[-1][0] == "error" and events[-1][1]["error"] == "queue_timeout"
        assert history(client) == [{"role": "user", "content": "me next"}]
    t.join()
    assert app.state.service.admission.waiting == 0


def test_retry_after_follows_the_measured_service_rate(serve):
    app = mock_app(concurrency=1, queue_size=0, mock_token_delay=0.001)
    url = serve(app).url
    with httpx.Client(base_url=url) as client:
        for _ in range(3):
            chat(client, "quick")
    slow = threading.Thread(target=lambda: httpx.post(f"{url}/chat_stream", json={"user_input": "x"}))
    app.state.service.engine.token_delay = 0.05
    slow.start()
    assert wait_until(lambda: app.state.service.admission.running == 1)
    r = httpx.post(f"{url}/chat_stream", json={"user_input": "me too"})
    slow.join()
    assert r.status_code == 503 and 1 <= int(r.headers["retry-after"]) <= 5  # was 310 s
