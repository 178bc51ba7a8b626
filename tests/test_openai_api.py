"""The OpenAI-compatible API, through a real server and the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from conftest import wait_until
from fastapi import FastAPI

from chatstream import ChatStream, Settings
from chatstream.engine.mock import MockEngine
from chatstream.web.app import create_app
from chatstream.web.openai import add_openai_routes

USER = [{"role": "user", "content": "hello there"}]


def mock_server(serve: Any, **settings: Any) -> tuple[str, ChatStream]:
    """``chatstream serve --mock`` with these settings: its URL and its ChatStream."""
    settings = {"mock": True, "mock_token_delay": 0.001, "session_secret": "test-secret", **settings}
    app = create_app(Settings(**settings))
    return serve(app).url, app.state.chat_stream


def client(url: str, api_key: str = "unused", **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, **options)


def chat(url: str, **kwargs: Any) -> Any:
    return client(url).chat.completions.create(**{"model": "mock", "messages": USER, **kwargs})


# -- chat completions ----------------------------------------------------------------------------

def test_models_lists_the_one_served_model(serve):
    url, _ = mock_server(serve)
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["mock"]
    assert client(url).models.retrieve("mock").owned_by == "chatstream"
    # Any name is accepted by default (like llama.cpp's server): clients that insist on one work.
    assert client(url).models.retrieve("gpt-4o").id == "gpt-4o"


def test_served_model_name_restricts_the_names(serve):
    url, _ = mock_server(serve, served_model_name="smol, smollm2")
    assert [m.id for m in client(url).models.list().data] == ["smol"]
    assert chat(url, model="smollm2").choices[0].message.content.startswith("You said")
    with pytest.raises(openai.NotFoundError) as exc:
        client(url).models.retrieve("gpt-4o")
    assert exc.value.code == "model_not_found"


@pytest.mark.parametrize("method, path", [("POST", "/v1/embeddings"), ("GET", "/v1/completions"),
                                          ("GET", "/v1/nothing/here"), ("DELETE", "/v1/files/x")])
def test_unknown_v1_routes_are_404_in_openai_format(serve, method, path):
    url, _ = mock_server(serve)
    r = httpx.request(method, url + path, json={"model": "x", "prompt": "hi"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and path in error["message"] and error["code"] == "unknown_url"


def test_non_streaming_chat_answers_with_the_whole_reply_and_usage(serve):
    url, _ = mock_server(serve)
    completion = chat(url)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "mock"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith("You said: hello there")
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_chat_gives_the_same_reply_in_deltas_then_usage(serve):
    url, _ = mock_server(serve)
    whole = chat(url)
    chunks = list(chat(url, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    *_, last_choice, usage_chunk = chunks
    assert last_choice.choices[0].finish_reason == "stop"
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()
    # Without include_usage there is no usage chunk.
    assert all(c.usage is None and c.choices for c in chat(url, stream=True))


@pytest.mark.parametrize("limit", [{"max_tokens": 3}, {"max_completion_tokens": 3}])
def test_token_limit_ends_with_finish_reason_length(serve, limit):
    url, _ = mock_server(serve)
    completion = chat(url, **limit)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3
    chunks = list(chat(url, stream=True, **limit))
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stop", ["said", ["nothing-like-this", "said"]])
def test_stop_strings_end_the_reply_before_them(serve, stop):
    url, _ = mock_server(serve)
    completion = chat(url, stop=stop)
    assert completion.choices[0].message.content == "You "
    assert completion.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(url, stop=stop, stream=True))
    assert streamed == "You "


def test_seed_makes_the_reply_reproducible(serve):
    url, _ = mock_server(serve)
    replies = {seed: chat(url, seed=seed, temperature=1.0).choices[0].message.content for seed in range(6)}
    assert chat(url, seed=3, temperature=1.0).choices[0].message.content == replies[3]
    assert len(set(replies.values())) > 1  # the seed reaches the engine


def test_history_comes_in_messages_with_every_role_and_text_parts(serve):
    url, _ = mock_server(serve)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer", "refusal": None},
        {"role": "developer", "content": [{"type": "text", "text": "Be nice."}]},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "question"}]},
    ]
    one = client(url).chat.completions.create(model="mock", messages=messages, user="someone-42")
    assert one.choices[0].message.content.startswith("You said: second\nquestion")
    shorter = client(url).chat.completions.create(model="mock", messages=messages[-1:])
    assert one.usage.prompt_tokens > shorter.usage.prompt_tokens  # the history was in the prompt


def test_the_model_may_be_left_out(serve):
    url, _ = mock_server(serve)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 200 and r.json()["model"] == "mock"


# -- refused requests ----------------------------------------------------------------------------

@pytest.mark.parametrize("param, value", [
    ("n", 9),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("store", True),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "low"),
    ("web_search_options", {}),
])
def test_unsupported_parameters_are_400_naming_them(serve, param, value):
    url, _ = mock_server(serve)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(url, **{param: value})
    assert exc.value.status_code == 400
    assert exc.value.param == param and exc.value.code == "unsupported_parameter"
    assert exc.value.type == "invalid_request_error" and param in exc.value.message


def test_parameters_that_ask_for_nothing_extra_are_accepted(serve):
    url, _ = mock_server(serve)
    completion = chat(
        url, n=1, logprobs=False, frequency_penalty=0, presence_penalty=0, response_format={"type": "text"},
        tool_choice="none", modalities=["text"], store=False, metadata={"k": "v"}, user="u1",
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    )
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": USER, "top_k": 9223372036854775808}, "top_k"),
    ({"messages": USER, "top_k": True}, "top_k"),
    ({"messages": USER, "repetition_penalty": 1e308}, "repetition_penalty"),
    ({"messages": [USER[0]] * 1001}, "messages"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "stop": [1]}, "stop"),
    ({"messages": USER, "seed": "42"}, "seed"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER, "best_of": 2}, "best_of"),
])
def test_bad_requests_are_400_in_openai_format(serve, body, param):
    url, _ = mock_server(serve)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_unknown_model_is_404_model_not_found(serve):
    url, _ = mock_server(serve)
    assert chat(url, model="any-name-at-all").choices  # without --served-model-name, any name
    url, _ = mock_server(serve, served_model_name="mock")
    with pytest.raises(openai.NotFoundError) as exc:
        chat(url, model="gpt-4o")
    assert exc.value.code == "model_not_found" and exc.value.param == "model"


def test_a_prompt_beyond_the_context_is_400_context_length_exceeded(serve):
    url, _ = mock_server(serve, context_len=300, max_new_tokens=100)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(url, messages=[{"role": "user", "content": "x" * 400}])
    assert exc.value.code == "context_length_exceeded"
    # Fits alone, but not with the completion asked for (the mock tokenizer is one token a byte).
    with pytest.raises(openai.BadRequestError) as exc:
        chat(url, messages=[{"role": "user", "content": "x" * 200}], max_tokens=100)
    assert exc.value.code == "context_length_exceeded"
    # With no max_tokens the reply gets what the context leaves.
    completion = chat(url, messages=[{"role": "user", "content": "x" * 200}])
    assert completion.usage.prompt_tokens + completion.usage.completion_tokens <= 300


def test_max_tokens_above_the_server_limit_is_clamped(serve):
    url, _ = mock_server(serve, max_new_tokens=4)
    completion = chat(url, max_tokens=100_000)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 4


def test_api_key_guards_every_v1_route(serve):
    url, _ = mock_server(serve, api_key="s3cret")
    with pytest.raises(openai.AuthenticationError) as exc:
        client(url, api_key="wrong").chat.completions.create(model="mock", messages=USER)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    for r in (httpx.get(f"{url}/v1/models"), httpx.post(f"{url}/v1/chat/completions", json={"messages": USER}),
              httpx.get(f"{url}/v1/models", headers={"authorization": "Basic czNjcmV0"})):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert client(url, api_key="s3cret").chat.completions.create(model="mock", messages=USER).choices
    assert [m.id for m in client(url, api_key="s3cret").models.list()] == ["mock"]
    assert httpx.get(f"{url}/health").status_code == 200  # only /v1/* is guarded


def test_model_not_loaded_is_503(serve, tmp_path):
    app = create_app(Settings(model=str(tmp_path / "no-such-model"), session_secret="test-secret"))
    url = serve(app).url
    assert wait_until(lambda: app.state.chat_stream.load_error is not None)
    with pytest.raises(openai.InternalServerError) as exc:
        client(url).chat.completions.create(model="no-such-model", messages=USER)
    assert exc.value.status_code == 503 and exc.value.code == "model_unavailable"


def test_model_still_loading_is_503_with_retry_after(serve):
    class LoadingEngine(MockEngine):
        ready = False  # type: ignore[assignment]

    chat_stream = ChatStream(use_mock_response=True)
    chat_stream.engine = LoadingEngine(chat_stream.tokenizer)
    app = FastAPI()
    add_openai_routes(app, chat_stream)
    r = httpx.post(f"{serve(app).url}/v1/chat/completions", json={"model": "mock", "messages": USER})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "model_loading"


# -- load control and disconnects ---------------------------------------------------------------

def test_overload_is_503_with_retry_after(serve):
    url, chat_stream = mock_server(serve, concurrency=1, queue_size=0, mock_token_delay=0.2)
    with chat(url, stream=True) as occupying:
        next(iter(occupying))
        assert chat_stream.admission.running == 1
        with pytest.raises(openai.InternalServerError) as exc:
            chat(url)
        assert exc.value.status_code == 503 and int(exc.value.response.headers["retry-after"]) >= 1
        assert exc.value.type == "server_error" and exc.value.code == "too_many_requests"


def test_one_queue_for_both_faces(serve):
    url, chat_stream = mock_server(serve, concurrency=1, queue_size=0, mock_token_delay=0.2)
    # /chat_stream holds the only slot: /v1 is refused.
    with httpx.stream("POST", f"{url}/chat_stream", json={"user_input": "hi"}, timeout=30) as r:
        lines = r.iter_lines()  # keep a reference: closing this iterator closes the connection
        while not next(lines).startswith("event: delta"):
            pass
        with pytest.raises(openai.InternalServerError) as exc:
            chat(url)
        assert exc.value.status_code == 503
    assert wait_until(lambda: chat_stream.admission.running == 0, timeout=5)
    # /v1 holds it: /chat_stream is refused.
    with chat(url, stream=True) as occupying:
        next(iter(occupying))
        r = httpx.post(f"{url}/chat_stream", json={"user_input": "hi"})
        assert r.status_code == 503 and r.json()["error"] == "too_many_requests"


def test_a_queued_request_waits_then_streams(serve):
    url, chat_stream = mock_server(serve, concurrency=1, queue_size=1, mock_token_delay=0.1)
    with chat(url, stream=True) as first:
        next(iter(first))
        with httpx.stream("POST", f"{url}/v1/chat/completions",
                          json={"model": "mock", "messages": USER, "stream": True}, timeout=30) as second:
            lines = second.iter_lines()
            assert next(lines) == ": queued, position 1"  # an SSE comment: clients skip it
            rest = list(lines)
    assert rest[-2] == "data: [DONE]"
    assert json.loads(rest[-4][6:])["choices"][0]["finish_reason"] == "stop"


def test_closing_a_stream_cancels_its_generation(serve):
    url, chat_stream = mock_server(serve, mock_token_delay=0.4)
    started = time.monotonic()
    with chat(url, stream=True) as stream:
        chunks = iter(stream)
        next(chunks), next(chunks)
        assert chat_stream.admission.running == 1 and chat_stream.engine.num_running == 1
    assert wait_until(lambda: chat_stream.admission.running == 0 and chat_stream.engine.num_running == 0, timeout=4)
    assert time.monotonic() - started < 5  # the whole reply takes ~8 s (bounds with room for a busy machine)


def test_leaving_a_non_streaming_request_cancels_its_generation(serve):
    url, chat_stream = mock_server(serve, mock_token_delay=0.4)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client(url, timeout=1.0).chat.completions.create(model="mock", messages=USER)
    assert wait_until(lambda: chat_stream.admission.running == 0 and chat_stream.engine.num_running == 0, timeout=4)
    assert time.monotonic() - started < 5  # the whole reply takes ~8 s


def test_leaving_while_queued_gives_the_place_up(serve):
    url, chat_stream = mock_server(serve, concurrency=1, queue_size=1, mock_token_delay=0.2)
    with chat(url, stream=True) as occupying:
        next(iter(occupying))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"model": "mock", "messages": USER}, timeout=0.5)
        assert wait_until(lambda: chat_stream.admission.waiting == 0, timeout=2)
        assert chat_stream.admission.running == 1
    assert wait_until(lambda: chat_stream.admission.running == 0, timeout=2)


# -- as a library, and with the real model ------------------------------------------------------

def test_add_openai_routes_to_your_own_app(serve):
    app = FastAPI()
    chat_stream = ChatStream(use_mock_response=True, mock_token_delay=0.001)
    add_openai_routes(app, chat_stream, api_key="k")
    url = serve(app).url
    completion = client(url, api_key="k").chat.completions.create(model="mock", messages=USER)
    assert completion.choices[0].message.content.startswith("You said: hello there")


def test_real_model_through_the_openai_client(serve, default_model):
    model, tokenizer = default_model
    chat_stream = ChatStream(model, tokenizer, temperature=0.0, max_new_tokens=8, context_len=512,
                             model_name="smol")
    app = FastAPI()
    add_openai_routes(app, chat_stream)
    url = serve(app).url
    ask = {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    whole = client(url, timeout=120).chat.completions.create(**ask, max_tokens=6)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    assert whole.choices[0].message.content.strip()
    streamed = list(client(url, timeout=120).chat.completions.create(**ask, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    sampled = [client(url, timeout=120).chat.completions.create(**ask, temperature=1.0, seed=7).choices[0]
               .message.content for _ in range(2)]
    asyncio.run(chat_stream.shutdown())  # gives the shared model its own layers back
    assert sampled[0] == sampled[1]
