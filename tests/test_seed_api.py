"""The seed article's endpoint code runs unchanged against chatstream."""

from __future__ import annotations

import httpx
from conftest import parse_sse, wait_until
from seed_apps import basic_app, callback_app, intercept_app

from chatstream import ChatStream


def _mock_chat_stream(**kwargs) -> ChatStream:
    return ChatStream(use_mock_response=True, mock_token_delay=0.001, **kwargs)


def test_basic_endpoint_streams_a_reply(serve):
    server = serve(basic_app(_mock_chat_stream()))
    with httpx.Client(base_url=server.url) as client:
        r = client.post("/chat_stream", json={"user_input": "Hello", "regenerate": False})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    deltas = [d["text"] for e, d in events if e == "delta"]
    assert "".join(deltas).startswith("You said: Hello")
    assert events[-1][0] == "done" and events[-1][1]["status"] == "success"


def test_intercepted_body_is_not_read_twice(serve):
    seen: list = []
    server = serve(intercept_app(_mock_chat_stream(), seen))
    with httpx.Client(base_url=server.url) as client:
        r = client.post("/chat_stream", json={"user_input": "intercepted", "regenerate": False})
    assert r.status_code == 200
    assert seen == [("intercepted", False)]
    assert "".join(d["text"] for e, d in parse_sse(r.text) if e == "delta").startswith("You said: intercepted")


def test_callback_sees_the_whole_conversation_with_the_reply(serve):
    calls: list = []
    server = serve(callback_app(_mock_chat_stream(), calls))
    with httpx.Client(base_url=server.url) as client:
        r1 = client.post("/chat_stream", json={"user_input": "first question", "regenerate": False})
        assert wait_until(lambda: len(calls) == 1)
        r2 = client.post("/chat_stream", json={"user_input": "second question", "regenerate": False})
        assert wait_until(lambda: len(calls) == 2)
    reply2 = "".join(d["text"] for e, d in parse_sse(r2.text) if e == "delta")
    assert [m for m, _ in calls] == ["success", "success"]
    prompt = calls[1][1]
    # ChatML rendering of the default tokenizer stand-in: both turns and the streamed reply.
    assert "first question" in prompt and "second question" in prompt
    assert prompt.rstrip().endswith(reply2 + "<|im_end|>")
    assert r1.status_code == 200
