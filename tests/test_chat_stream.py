"""The /chat_stream protocol through a real server: streaming, history, load control, disconnects."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest
from conftest import parse_sse, wait_until
from fastapi import FastAPI, Request

from chatstream import ChatStream
from chatstream.engine import GenerationOutput, SamplingParams
from chatstream.engine.stream import RequestStream


class Recorder:
    """An app with the seed-style endpoint whose callback records (message, prompt) pairs."""

    def __init__(self, chat_stream: ChatStream) -> None:
        self.chat_stream = chat_stream
        self.calls: list[tuple[str, str]] = []
        self.app = FastAPI()
        chat_stream.append_middlewares(self.app)

        @self.app.post("/chat_stream")
        async def stream_api(request: Request):
            return await chat_stream.handle_chat_stream_request(request, callback=self._callback)

        self.app.add_route("/clear_context", chat_stream.handle_clear_context_request, methods=["POST"])
        self.app.add_route("/history", chat_stream.handle_history_request, methods=["GET"])
        self.app.add_route("/health", chat_stream.handle_health_request, methods=["GET"])

    async def _callback(self, request: Request, message: str) -> None:  # a coroutine callback
        chat_prompt = request.state.session.get_session().get("chat_prompt")
        self.calls.append((message, chat_prompt.create_prompt()))


def mock_stream(**kwargs: Any) -> ChatStream:
    kwargs.setdefault("mock_token_delay", 0.001)
    return ChatStream(use_mock_response=True, session_secret="test-secret", **kwargs)


def chat(client: httpx.Client, text: str = "Hello", **extra: Any) -> httpx.Response:
    return client.post("/chat_stream", json={"user_input": text, "regenerate": False, **extra})


def deltas(response: httpx.Response) -> str:
    return "".join(d["text"] for e, d in parse_sse(response.text) if e == "delta")


def history(client: httpx.Client) -> list[dict[str, str]]:
    return client.get("/history").json()["messages"]


@pytest.fixture
def recorder(serve):
    rec = Recorder(mock_stream())
    rec.server = serve(rec.app)
    rec.client = httpx.Client(base_url=rec.server.url, timeout=30)
    yield rec
    rec.client.close()


# -- streaming and history --

def test_sse_deltas_concatenate_to_the_reply_stored_in_history(recorder):
    r = chat(recorder.client, "What is up?")
    events = parse_sse(r.text)
    assert [e for e, _ in events][-1] == "done"
    done = events[-1][1]
    assert done["status"] == "success" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0
    assert set(done["timing"]) == {"queue_s", "ttft_s", "tokens_per_s"}
    assert history(recorder.client) == [
        {"role": "user", "content": "What is up?"},
        {"role": "assistant", "content": deltas(r)},
    ]
    assert wait_until(lambda: recorder.calls and recorder.calls[0][0] == "success")


def test_plain_text_mode_streams_bare_text(recorder):
    for kwargs in ({"headers": {"Accept": "text/plain"}}, {"params": {"format": "text"}}):
        r = recorder.client.post("/chat_stream", json={"user_input": "curl me"}, **kwargs)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text == history(recorder.client)[-1]["content"]
        assert r.text.startswith("You said: curl me")


def test_regenerate_replaces_the_last_reply(recorder):
    chat(recorder.client, "one")
    chat(recorder.client, "two")
    before = history(recorder.client)
    r = recorder.client.post("/chat_stream", json={"user_input": "", "regenerate": True, "seed": 7})
    assert r.status_code == 200
    after = history(recorder.client)
    assert after[:3] == before[:3]
    assert len(after) == 4 and after[3]["content"] == deltas(r)
    assert after[3]["alternatives"] == [before[3]["content"]]  # the earlier answer is kept, not shown to the model


def test_regenerate_on_empty_history_is_refused_and_changes_nothing(recorder):
    r = recorder.client.post("/chat_stream", json={"user_input": "x", "regenerate": True})
    assert r.status_code == 400 and r.json()["error"] == "nothing_to_regenerate"
    assert history(recorder.client) == []
    assert recorder.calls == []


def test_clear_context_empties_the_history(recorder):
    chat(recorder.client, "remember me")
    assert len(history(recorder.client)) == 2
    r = recorder.client.post("/clear_context")
    assert r.status_code == 200
    assert history(recorder.client) == []


def test_sessions_are_separate_per_client(recorder):
    chat(recorder.client, "mine")
    with httpx.Client(base_url=recorder.server.url) as other:
        assert history(other) == []


def test_generation_overrides_are_validated(recorder):
    r = chat(recorder.client, "hi", max_tokens=3)
    assert parse_sse(r.text)[-1][1]["finish_reason"] == "length"
    assert parse_sse(r.text)[-1][1]["usage"]["completion_tokens"] == 3
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": "x"}, {"stop": 5}, {"max_tokens": True},
                {"top_k": 9223372036854775808}, {"seed": 1 << 64}, {"repetition_penalty": 1e308}):
        r = chat(recorder.client, "hi", **bad)
        assert r.status_code == 400, bad
        assert next(iter(bad)) in r.json()["message"], r.json()
    for raw in (b'{"user_input": "hi", "temperature": 1e400}', b'{"user_input": "hi", "top_p": NaN}',
                b'{"user_input": "hi", "seed": ' + b"9" * 5000 + b"}"):
        r = recorder.client.post("/chat_stream", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", raw[:60]


def test_max_tokens_above_the_server_limit_is_clamped(serve):
    rec = Recorder(mock_stream(max_new_tokens=4))
    server = serve(rec.app)
    with httpx.Client(base_url=server.url) as c:
        done = parse_sse(chat(c, "hi", max_tokens=100_000).text)[-1][1]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 4


# -- bad input --

@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"regenerate": false}', 400, "'user_input' is required"),
        (b'{"user_input": ""}', 400, "must not be empty"),
        (b'{"user_input": "   "}', 400, "must not be empty"),
        (b'{"user_input": 42}', 400, "must be a string"),
        (b'{"user_input": "hi", "regenerate": "yes"}', 400, "'regenerate' must be true or false"),
        (b'{"user_input": "hi", "regenrate": true}', 400, "unknown field"),
        (json.dumps({"user_input": "x" * 8001}).encode(), 413, "the model's context of 1,024 tokens leaves 768"),
        (json.dumps({"user_input": "x" * 16385}).encode(), 413, "16,385 characters; this server takes at most 16,384"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(recorder, body, status, fragment):
    chat(recorder.client, "keep me")
    before = history(recorder.client)
    r = recorder.client.post("/chat_stream", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert fragment in r.json()["message"]
    assert history(recorder.client) == before
    assert len(recorder.calls) == 1  # only the first, successful turn called back


@pytest.mark.parametrize("cookie", ["garbage", "abc.def.ghi", "", "x" * 5000])
def test_a_bad_session_cookie_means_a_fresh_session(recorder, cookie):
    chat(recorder.client, "private")
    good = recorder.client.cookies["chatstream_session"]
    sid, _, signature = good.partition(".")
    for value in (cookie, sid + ".AAAA" + signature[4:], good[:-2] + "xx"):
        with httpx.Client(base_url=recorder.server.url, cookies={"chatstream_session": value}) as c:
            r = c.get("/history")
            assert r.status_code == 200 and r.json() == {"messages": []}
            assert "set-cookie" not in r.headers  # reading changes nothing: no session is made
            r = chat(c, "fresh")
            assert r.status_code == 200 and "chatstream_session=" in r.headers["set-cookie"]


def test_session_cookie_is_signed_httponly_and_samesite(recorder):
    r = chat(recorder.client, "cookie")
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    # A cookie signed with another secret is not accepted.
    from conftest import live_server

    other = Recorder(ChatStream(use_mock_response=True, session_secret="another-secret"))
    with live_server(other.app) as s2, httpx.Client(base_url=s2.url, cookies=recorder.client.cookies) as c:
        assert c.get("/history").json() == {"messages": []}
    assert history(recorder.client) != []


def test_only_routes_that_use_the_session_set_a_cookie(recorder):
    with httpx.Client(base_url=recorder.server.url) as c:
        assert "set-cookie" not in c.get("/health").headers
        assert "chatstream_session=" in chat(c, "hello").headers["set-cookie"]
        assert "set-cookie" not in chat(c, "again").headers  # known session: no new cookie


# -- load control --

def _stream_in_background(url: str, text: str, results: dict, cookies: Any = None) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=30, cookies=cookies) as c:
            results[text] = c.post("/chat_stream", json={"user_input": text})

    t = threading.Thread(target=run)
    t.start()
    return t


def test_queue_limits_answer_503_with_retry_after(serve):
    rec = Recorder(mock_stream(num_of_concurrent_executions=1, max_queue_size=1, mock_token_delay=0.05))
    server = serve(rec.app)
    results: dict = {}
    first = _stream_in_background(server.url, "first", results)
    assert wait_until(lambda: rec.chat_stream.admission.running == 1)
    second = _stream_in_background(server.url, "second", results)
    assert wait_until(lambda: rec.chat_stream.admission.waiting == 1)
    with httpx.Client(base_url=server.url) as c:
        r = chat(c, "third")
        assert r.status_code == 503
        assert r.json()["error"] == "too_many_requests"
        assert int(r.headers["Retry-After"]) >= 1
        assert history(c) == []  # the refused turn left no trace
    first.join()
    second.join()
    assert parse_sse(results["first"].text)[-1][0] == "done"
    queued = [d["position"] for e, d in parse_sse(results["second"].text) if e == "queued"]
    assert queued == [1]
    assert parse_sse(results["second"].text)[-1][0] == "done"


def test_queue_positions_are_reported_as_they_change(serve):
    rec = Recorder(mock_stream(num_of_concurrent_executions=1, max_queue_size=3, mock_token_delay=0.03))
    server = serve(rec.app)
    results: dict = {}
    threads = [_stream_in_background(server.url, "a", results)]
    assert wait_until(lambda: rec.chat_stream.admission.running == 1)
    for name, waiting in (("b", 1), ("c", 2)):
        threads.append(_stream_in_background(server.url, name, results))
        assert wait_until(lambda waiting=waiting: rec.chat_stream.admission.waiting == waiting)
    for t in threads:
        t.join()
    assert [d["position"] for e, d in parse_sse(results["c"].text) if e == "queued"] == [2, 1]
    assert all(parse_sse(results[n].text)[-1][0] == "done" for n in "abc")


def test_second_request_on_a_busy_session_gets_409_and_history_is_untouched(serve):
    rec = Recorder(mock_stream(mock_token_delay=0.05))
    server = serve(rec.app)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        chat(c, "setup")
        results: dict = {}
        t = _stream_in_background(server.url, "long one", results, cookies=c.cookies)
        assert wait_until(lambda: rec.chat_stream.admission.running == 1)
        r = chat(c, "impatient")
        assert r.status_code == 409 and r.json()["error"] == "session_busy"
        assert c.post("/clear_context").status_code == 409
        t.join()
        contents = [m["content"] for m in history(c)]
    assert "impatient" not in contents
    assert contents[2] == "long one" and len(contents) == 4


# -- disconnects and the callback --

def test_client_leaving_mid_stream_stops_generation_and_keeps_the_partial_reply(serve):
    rec = Recorder(mock_stream(num_of_concurrent_executions=1, mock_token_delay=0.05))
    server = serve(rec.app)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        received = ""
        with c.stream("POST", "/chat_stream", json={"user_input": "tell me a story"}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and "text" in line:
                    received += json.loads(line[5:])["text"]
                    if len(received) > 12:
                        break
        assert wait_until(lambda: len(rec.calls) == 1, timeout=5)
        assert rec.calls[0][0] == "client_disconnected_while_streaming"
        # The slot is free at once and the partial reply is in the history.
        assert rec.chat_stream.admission.running == 0
        assert rec.chat_stream.engine.num_running == 0
        partial = history(c)[-1]
        assert partial["role"] == "assistant" and partial["content"].startswith(received)
        assert len(partial["content"]) < len("You said: tell me a story") + 40
        assert partial["content"] in rec.calls[0][1]


def test_client_leaving_the_queue_spends_no_generation(serve):
    rec = Recorder(mock_stream(num_of_concurrent_executions=1, max_queue_size=2, mock_token_delay=0.05))
    server = serve(rec.app)
    results: dict = {}
    busy = _stream_in_background(server.url, "occupy the slot", results)
    assert wait_until(lambda: rec.chat_stream.admission.running == 1)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/chat_stream", json={"user_input": "I will not wait"}) as r:
            first = next(r.iter_lines())
            assert first == "event: queued"
        assert wait_until(lambda: any(m == "client_disconnected_before_streaming" for m, _ in rec.calls), timeout=5)
        assert rec.chat_stream.admission.waiting == 0
        assert rec.chat_stream.admission.running == 1  # only the first request is generating
        assert history(c) == [{"role": "user", "content": "I will not wait"}]
    busy.join()
    assert sorted(m for m, _ in rec.calls) == ["client_disconnected_before_streaming", "success"]


class FailingEngine:
    """A third-party engine that fails after two deltas (the Engine interface is public)."""

    ready = True

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, prompt_token_ids, params: SamplingParams, request_id=None) -> RequestStream:
        import asyncio

        stream = RequestStream(asyncio.get_running_loop(), lambda _id: None, request_id)
        stream.put_nowait(GenerationOutput(text="Hel"))
        stream.put_nowait(GenerationOutput(text="lo"))
        stream.put_nowait(GenerationOutput(text="", finished=True, finish_reason="error", error="GPU on fire"))
        return stream


def test_engine_failure_reports_unknown_error(serve):
    from chatstream.engine.mock import MockTokenizer

    rec = Recorder(ChatStream(engine=FailingEngine(), tokenizer=None, session_secret="s"))
    rec.chat_stream.tokenizer = MockTokenizer()
    server = serve(rec.app)
    with httpx.Client(base_url=server.url) as c:
        r = chat(c, "hi")
        events = parse_sse(r.text)
        assert events[-1] == ("error", {"error": "generation_failed", "message": "GPU on fire"})
        assert wait_until(lambda: rec.calls and rec.calls[0][0] == "unknown_error_occurred")
        assert history(c)[-1] == {"role": "assistant", "content": "Hello"}


# -- context --

def test_long_conversations_drop_the_oldest_whole_turns(serve):
    rec = Recorder(mock_stream(max_new_tokens=64, context_len=400, system_prompt="SYSTEM RULES"))
    server = serve(rec.app)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i in range(6):
            r = chat(c, f"turn number {i} " + "pad " * 10)
            done = parse_sse(r.text)[-1][1]
            assert done["status"] == "success"
            assert done["usage"]["prompt_tokens"] <= 400 - 64
        assert len(history(c)) == 12  # the stored history keeps everything


def test_input_that_cannot_fit_the_context_is_413(serve):
    rec = Recorder(mock_stream(max_new_tokens=64, context_len=200))
    server = serve(rec.app)
    with httpx.Client(base_url=server.url) as c:
        r = chat(c, "word " * 100)
        assert r.status_code == 413 and r.json()["error"] == "input_too_large"
        assert history(c) == []
