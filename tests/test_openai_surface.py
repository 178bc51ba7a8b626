"""The wider OpenAI surface on the mock engine: served names, CORS, /v1/completions, tools, logit_bias,
and Open WebUI's request bodies (tests/fixtures/openwebui). Grammar-constrained output needs the real
model: see test_structured_output.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from chatstream import Settings
from chatstream.web.app import create_app
from chatstream.web.openai.tools import ToolCallStream, parse_tool_calls

FIXTURES = Path(__file__).parent / "fixtures"
USER = [{"role": "user", "content": "hello there"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
R_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's shape of a function tool
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class Weather(BaseModel):
    """The weather in a city"""

    city: str


def mock_server(serve: Any, **settings: Any) -> str:
    settings = {"mock": True, "mock_token_delay": 0.001, "session_secret": "test-secret", **settings}
    return serve(create_app(Settings(**settings))).url


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


def sse_events(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


# -- the served name ---------------------------------------------------------------------------

def test_responses_name_the_served_model(serve):
    url = mock_server(serve, served_model_name="smol, smollm2")
    c = client(url)
    assert c.chat.completions.create(model="smollm2", messages=USER).model == "smollm2"
    chunks = list(c.chat.completions.create(model="smol", messages=USER, stream=True))
    assert {chunk.model for chunk in chunks} == {"smol"}
    # Left out: the first served name, never the internal one.
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": USER}).json()["model"] == "smol"
    assert c.completions.create(model="smollm2", prompt="Once upon").model == "smollm2"


# -- CORS ----------------------------------------------------------------------------------------

def test_cors_preflight_and_answers_for_a_browser_app_with_a_key(serve):
    url = mock_server(serve, api_key="k", cors_origins="https://app.example.com")
    preflight = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER},
                   headers={"Origin": "https://app.example.com", "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-credentials" not in r.headers  # keys, never cookies
    # Another origin gets no grant, and the key is still required.
    other = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": USER},
                      headers={"Origin": "https://app.example.com"}).status_code == 401


def test_without_cors_origins_there_are_no_cors_headers(serve):
    url = mock_server(serve)
    r = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


# -- /v1/completions -------------------------------------------------------------------------------

def test_completions_whole_and_streamed(serve):
    url = mock_server(serve)
    c = client(url)
    whole = c.completions.create(model="mock", prompt="Once upon a time", max_tokens=5)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    (choice,) = whole.choices
    assert choice.text and choice.finish_reason == "length" and whole.usage.completion_tokens == 5
    assert whole.usage.prompt_tokens == len(b"Once upon a time")  # the mock tokenizer: a token a byte
    chunks = list(c.completions.create(model="mock", prompt=["Once upon a time"], max_tokens=5, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-2].choices[0].finish_reason == "length"
    tokens = c.completions.create(model="mock", prompt=list(b"Hi"), max_tokens=3)
    assert tokens.usage.prompt_tokens == 2


def test_completions_default_to_16_tokens_like_openai(serve):
    url = mock_server(serve)
    done = client(url).completions.create(model="mock", prompt="x " * 10)
    assert done.usage.completion_tokens == 16 and done.choices[0].finish_reason == "length"


def test_completions_n_choices_and_echo(serve):
    url = mock_server(serve, concurrency=2, queue_size=4)
    c = client(url)
    ask = {"model": "mock", "prompt": "Once upon a time", "max_tokens": 12, "seed": 3, "temperature": 1.0}
    whole = c.completions.create(**ask, n=3)
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    assert len({choice.text for choice in whole.choices}) > 1  # each choice has its own seed
    assert whole.choices[0].text == c.completions.create(**ask).choices[0].text
    assert whole.usage.prompt_tokens == len(b"Once upon a time") and whole.usage.completion_tokens == 36
    chunks = list(c.completions.create(**ask, n=3, stream=True, stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[-1].usage.completion_tokens == 36
    for i in range(3):
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i) \
            == whole.choices[i].text
    assert sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason) == [0, 1, 2]
    # echo: the prompt, then its continuation (token-id prompts are decoded), whole and streamed.
    echoed = c.completions.create(**ask, echo=True).choices[0].text
    assert echoed == "Once upon a time" + whole.choices[0].text
    assert c.completions.create(**{**ask, "prompt": list(b"Once upon a time")}, echo=True).choices[0].text == echoed
    streamed = list(c.completions.create(**ask, echo=True, stream=True))
    assert streamed[0].choices[0].text == "Once upon a time"
    assert "".join(ch.choices[0].text for ch in streamed) == echoed
    assert whole.choices[0].logprobs is None  # not asked for


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a", "n": 9}, "n"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "echo": "yes"}, "echo"),
    ({"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "logprobs": True}, "logprobs"),
    ({"prompt": "a", "n": 2, "best_of": 3}, "best_of"),
    ({"prompt": "a", "suffix": "end"}, "suffix"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "temperature": 3}, "temperature"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "wat": 1}, "wat"),
    ({"prompt": [1, -5]}, "prompt"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "a", "response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_bad_completions_are_400_naming_the_parameter(serve, body, param):
    url = mock_server(serve)
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- tools -------------------------------------------------------------------------------------------

def test_tools_are_accepted_and_a_text_answer_stays_text(serve):
    url = mock_server(serve)
    reply = client(url).chat.completions.create(model="mock", messages=USER, tools=[WEATHER], tool_choice="auto")
    (choice,) = reply.choices
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content.startswith("You said: hello there")


def test_a_tool_call_in_the_reply_comes_back_as_tool_calls(serve):
    # The mock echoes the user's message, so the reply carries the call exactly as a model writes it.
    url = mock_server(serve, max_new_tokens=400)
    ask = {"model": "mock", "messages": [{"role": "user", "content": CALL}], "tools": [WEATHER]}
    reply = client(url).chat.completions.create(**ask)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "You said:"  # the text before the call
    # Streamed: the text streams, then the call as OpenAI sends it: id, type and name with empty
    # arguments first, then the arguments in fragments as they are generated; finish_reason tool_calls.
    chunks = list(client(url).chat.completions.create(**ask, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "<tool_call>" not in text and text.strip() == "You said:"
    first, *rest = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert len(rest) > 1 and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_openai_sdk_stream_helper_assembles_streamed_calls(serve):
    url = mock_server(serve, max_new_tokens=400)
    two = CALL + CALL.replace("Paris", "Oslo")
    with client(url).chat.completions.stream(model="mock", messages=[{"role": "user", "content": two}],
                                             tools=[openai.pydantic_function_tool(Weather, name="get_weather")]) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    arg_deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(arg_deltas) >= 4 and {e.index for e in arg_deltas} == {0, 1}
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.parsed_arguments) for e in done] == [("get_weather", Weather(city="Paris")),
                                                           ("get_weather", Weather(city="Oslo"))]
    calls = final.choices[0].message.tool_calls
    assert [c.function.parsed_arguments.city for c in calls] == ["Paris", "Oslo"]
    assert final.choices[0].finish_reason == "tool_calls" and len({c.id for c in calls}) == 2


def test_langchain_aggregates_streamed_tool_call_chunks(serve):
    from langchain_openai import ChatOpenAI

    url = mock_server(serve, max_new_tokens=400)
    llm = ChatOpenAI(model="mock", base_url=f"{url}/v1", api_key="unused", max_retries=0).bind_tools([WEATHER])
    chunks = list(llm.stream(CALL))
    assert sum(1 for c in chunks if c.tool_call_chunks) >= 3  # the name, then fragments, not one whole call
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    (call,) = total.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"} and call["id"].startswith("call_")


def test_parallel_tool_calls_false_keeps_only_the_first_call(serve):
    url = mock_server(serve, max_new_tokens=400)
    two = [{"role": "user", "content": CALL + CALL.replace("Paris", "Oslo")}]
    c = client(url)
    both = c.chat.completions.create(model="mock", messages=two, tools=[WEATHER])
    assert len(both.choices[0].message.tool_calls) == 2  # parallel_tool_calls defaults to true
    one = c.chat.completions.create(model="mock", messages=two, tools=[WEATHER], parallel_tool_calls=False)
    (call,) = one.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(c.chat.completions.create(model="mock", messages=two, tools=[WEATHER], parallel_tool_calls=False,
                                            stream=True))
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
    assert {d.index for d in deltas} == {0} and sum(1 for d in deltas if d.id) == 1
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_messages_in_the_history_are_accepted(serve):
    url = mock_server(serve)
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    reply = client(url).chat.completions.create(model="mock", messages=messages, tools=[WEATHER])
    # The mock echoes the last user-side message: the tool result, written as a <tool_response>.
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in reply.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}], "tools": [WEATHER]}, None),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"logit_bias": {"abc": 3}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"5": 300}}, "logit_bias"),
])
def test_bad_tool_and_format_fields_are_400_naming_them(serve, body, param):
    url = mock_server(serve)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, **body})
    if param is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("text, fmt, content, calls", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "hermes", None, [("f", {"a": 1})]),
    ('Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {"b": "x"}}'
     '</tool_call>', "hermes", "Sure.", [("f", {}), ("g", {"b": "x"})]),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}', "hermes", None, []),  # cut off: stays text
    ('{"name": "f", "parameters": {"a": 1}}', "llama3_json", None, [("f", {"a": 1})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}', "llama3_json", None,
     [("f", {}), ("g", {})]),
    ('The answer is {x}', "llama3_json", None, []),
    ('[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', "mistral", None, [("f", {"a": 1})]),
    ("no calls here", "mistral", None, []),
])
def test_tool_call_formats_parse_whole_and_streamed(text, fmt, content, calls):
    got_content, got = parse_tool_calls(text, fmt)
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
    if calls:
        assert got_content == content
    else:
        assert got_content == text
    if text.startswith('<tool_call>{"name": "f", "arguments": {"a": 1') and not calls:
        return  # cut off: streamed, its name and the arguments so far have gone out (see the test below)
    # Streamed a few characters at a time, the same calls, and exactly the text around them.
    stream = ToolCallStream(fmt)
    sent, deltas = "", []
    for i in range(0, len(text), 3):
        piece, new = stream.feed(text[i:i + 3])
        sent, deltas = sent + piece, deltas + new
    rest, last = stream.finish()
    assert [(c["name"], json.loads(c["arguments"])) for c in stream.calls] == calls
    assert _assembled(deltas + last) == [(c["name"], c["arguments"]) for c in stream.calls]
    assert (sent + rest).strip() == (content or "" if calls else text).strip()


def _assembled(deltas: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Tool-call deltas put together the way OpenAI's clients do (by index, arguments concatenated)."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if "id" in delta:
            assert delta["function"]["arguments"] == "" and delta["type"] == "function"
            calls[delta["index"]] = [delta["function"]["name"], ""]
        calls[delta["index"]][1] += delta["function"]["arguments"]
    return [(name, arguments) for name, arguments in calls.values()]


@pytest.mark.parametrize("fmt, text", [
    ("hermes", 'I will look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
               '</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}]'),
])
def test_a_streamed_call_sends_its_name_first_then_argument_fragments(fmt, text):
    stream = ToolCallStream(fmt)
    per_token = [stream.feed(text[i:i + 2])[1] for i in range(0, len(text), 2)]
    sent = [d for deltas in per_token for d in deltas]
    assert sent[0]["function"] == {"name": "get_weather", "arguments": ""} and sent[0]["id"].startswith("call_")
    fragments = [d["function"]["arguments"] for d in sent[1:]]
    assert len(fragments) > 5  # as generated, not the whole call at the end
    assert json.loads("".join(fragments)) == {"city": "Paris", "days": [1, 2]}
    # The name went out before the arguments were complete.
    first = next(i for i, deltas in enumerate(per_token) if deltas)
    assert first < len(per_token) - 5
    assert stream.finish() == ("", [])


def test_a_call_cut_off_by_the_token_limit_streams_what_was_written():
    stream = ToolCallStream("hermes")
    _, deltas = stream.feed('<tool_call>{"name": "f", "arguments": {"a": 1')
    assert _assembled(deltas + stream.finish()[1]) == [("f", '{"a": 1')]
    # Arguments a model wrote as a JSON string: their content, decoded as far as it goes.
    stream = ToolCallStream("hermes")
    _, deltas = stream.feed('<tool_call>{"name": "f", "arguments": "{\\"a')
    assert _assembled(deltas + stream.finish()[1]) == [("f", '{"a')]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"42": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ("/v1/responses", {"input": "x", "tools": [R_WEATHER], "tool_choice": "required"}, "tool_choice"),
])
def test_what_the_mock_engine_cannot_honour_is_refused_not_ignored(serve, path, body, param):
    url = mock_server(serve)
    r = httpx.post(url + path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["code"] == "unsupported_parameter"
    r = httpx.post(f"{url}/chat_stream", json={"user_input": "hi", "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "response_format" in r.json()["message"]


# -- Open WebUI -----------------------------------------------------------------------------------------
# Request bodies recorded from a real Open WebUI 0.12.4 with its default settings (tests/fixtures/openwebui/).

def _openwebui(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / "openwebui" / f"{name}.json").read_text())


OPENWEBUI_CHATS = ["chat_first_message", "chat_second_turn"]  # Regenerate resent chat_first_message as it was
OPENWEBUI_TASKS = ["title_generation", "follow_up_generation", "tags_generation"]


def openwebui_server(serve: Any, **settings: Any) -> str:
    # The mock tokenizer counts a token a byte: the 26 KB of tools need a context like a real model's.
    # The name is the one Open WebUI read from /v1/models in the recorded run (the embedded model's).
    return mock_server(serve, context_len=1 << 16, served_model_name="SmolLM2-135M-Instruct", **settings)


def test_open_webui_default_chat_sends_its_36_builtin_tools_and_no_usage_request():
    body = _openwebui("chat_first_message")
    assert body["stream"] is True and "stream_options" not in body and "tool_choice" not in body
    assert len(body["tools"]) == 36 and {"search_memories", "get_current_timestamp"} <= {
        t["function"]["name"] for t in body["tools"]}


@pytest.mark.parametrize("name", OPENWEBUI_CHATS)
def test_open_webui_chats_stream_with_its_default_tools(serve, name):
    url = openwebui_server(serve)
    body = _openwebui(name)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text.startswith("You said:")
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[-1]  # none asked for
    assert {e["model"] for e in events} == {body["model"]}


def test_open_webui_stop_ends_the_generation_on_the_server(serve):
    url = openwebui_server(serve, mock_token_delay=0.05)
    # Stop in Open WebUI closes its upstream request: the turn ends there, counted as a disconnect.
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_openwebui("chat_stopped"), timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            chunk = json.loads(line[6:]) if line.startswith("data: {") else {}
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                break  # the first words are on the screen: the person clicks Stop
    for _ in range(100):
        metrics = httpx.get(f"{url}/metrics").text
        if 'chatstream_turns_total{face="openai",outcome="client_disconnected_while_streaming"} 1.0' in metrics:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the stopped turn was not ended on the server")
    assert 'outcome="success"' not in metrics


@pytest.mark.parametrize("name", OPENWEBUI_TASKS)
def test_open_webui_background_tasks_answer_whole(serve, name):
    url = openwebui_server(serve)
    body = _openwebui(name)
    assert body["stream"] is False and "tools" not in body
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] and r.json()["model"] == body["model"]


# -- /v1/responses --------------------------------------------------------------------------------------

def test_responses_text_in_text_out_with_instructions(serve):
    url = mock_server(serve, served_model_name="smol")
    response = client(url).responses.create(model="smol", input="hello there", instructions="Be brief.")
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text.startswith("You said: hello there") and response.model == "smol"
    assert response.instructions == "Be brief." and response.usage.output_tokens > 0


def test_responses_chain_with_previous_response_id_from_the_session_store(serve):
    url = mock_server(serve)
    c = client(url)
    first = c.responses.create(model="mock", input="my name is Ada", max_output_tokens=3)
    assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens"
    second = c.responses.create(model="mock", input=[{"role": "user", "content": "what is my name?"}],
                                previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The prompt held the whole conversation: the mock counts it in the usage.
    assert second.usage.input_tokens > first.usage.input_tokens + len(first.output_text)
    assert c.responses.retrieve(first.id).output_text == first.output_text
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="mock", input="again", previous_response_id=first.id)
    unstored = c.responses.create(model="mock", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_responses_stream_typed_events(serve):
    url = mock_server(serve)
    events = list(client(url).responses.create(model="mock", input="hello there", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text and text.startswith("You said: hello there")


def test_responses_return_function_calls_and_take_their_outputs(serve):
    url = mock_server(serve, max_new_tokens=400)
    c = client(url)
    first = c.responses.create(model="mock", input=CALL, tools=[R_WEATHER])
    message, call = first.output
    assert message.type == "message" and message.content[0].text.strip() == "You said:"
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    assert first.tools[0].name == "get_weather" and first.tool_choice == "auto"
    # The result goes back as a function_call_output, continuing the stored conversation; the model
    # reads it as a tool result (the mock echoes it as the template wrote it).
    second = c.responses.create(model="mock", previous_response_id=first.id, tools=[R_WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in second.output_text
    # Or the client keeps the state: the first reply's output items sent back as input.
    manual = c.responses.create(model="mock", store=False, tools=[R_WEATHER], input=[
        {"role": "user", "content": CALL}, *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert manual.output_text == second.output_text
    # parallel_tool_calls false: one call of two.
    two = c.responses.create(model="mock", input=CALL + CALL.replace("Paris", "Oslo"), tools=[R_WEATHER])
    assert [i.type for i in two.output] == ["message", "function_call", "function_call"]
    one = c.responses.create(model="mock", input=CALL + CALL.replace("Paris", "Oslo"), tools=[R_WEATHER],
                             parallel_tool_calls=False)
    assert [i.type for i in one.output] == ["message", "function_call"]


def test_responses_stream_function_call_arguments(serve):
    url = mock_server(serve, max_new_tokens=400)
    with client(url).responses.stream(model="mock", input=CALL, tools=[R_WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["message", "function_call"]
    assert added[1].item.name == "get_weather" and added[1].item.arguments == "" and added[1].output_index == 1
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and {e.item_id for e in deltas} == {added[1].item.id}  # fragments as generated
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == "".join(e.delta for e in deltas) and json.loads(done.arguments) == {"city": "Paris"}
    # The message is done before the call starts; the call's item is done before the response.
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    assert final.output[1].arguments == done.arguments and final.output[1].call_id == added[1].item.call_id
    assert client(url).responses.retrieve(final.id).output[1].call_id == final.output[1].call_id


@pytest.mark.parametrize("body, param", [
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [R_WEATHER], "tool_choice": "often"}, "tool_choice"),
    ({"input": "x", "tools": [R_WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": "x", "previous_response_id": "../etc"}, "previous_response_id"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}},
     "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
])
def test_bad_responses_are_400_naming_the_field(serve, body, param):
    url = mock_server(serve)
    r = httpx.post(f"{url}/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- n ------------------------------------------------------------------------------------------------

def test_n_choices_whole_and_streamed(serve):
    url = mock_server(serve, concurrency=2, queue_size=5)
    c = client(url)
    whole = c.chat.completions.create(model="mock", messages=USER, n=3, seed=5, temperature=1.0)
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    assert all(choice.message.content.startswith("You said: hello there") for choice in whole.choices)
    assert len({choice.message.content for choice in whole.choices}) > 1  # each choice has its own seed
    single = c.chat.completions.create(model="mock", messages=USER, seed=5, temperature=1.0)
    assert whole.choices[0].message.content == single.choices[0].message.content
    per_choice = single.usage.completion_tokens
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert whole.usage.completion_tokens == sum(
        c.chat.completions.create(model="mock", messages=USER, seed=5 + i, temperature=1.0).usage.completion_tokens
        for i in range(3)) and per_choice > 0
    chunks = list(c.chat.completions.create(model="mock", messages=USER, n=3, seed=5, temperature=1.0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1
    for i in range(3):
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
        assert text == whole.choices[i].message.content
    finishes = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert sorted(f.index for f in finishes) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_beyond_what_the_server_can_hold_is_400_and_a_full_queue_503(serve):
    url = mock_server(serve, concurrency=1, queue_size=2, mock_token_delay=0.05)
    with pytest.raises(openai.BadRequestError) as exc:
        client(url).chat.completions.create(model="mock", messages=USER, n=4)
    assert exc.value.param == "n"
    with client(url).chat.completions.create(model="mock", messages=USER, stream=True) as busy:
        next(iter(busy))  # one slot taken: n=3 no longer fits, and nothing of it starts
        with pytest.raises(openai.InternalServerError) as exc:
            client(url).chat.completions.create(model="mock", messages=USER, n=3)
        assert exc.value.status_code == 503
    assert client(url).chat.completions.create(model="mock", messages=USER, n=3).choices[2].index == 2



@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
     "response_format.json_schema.schema"),
    ({"type": "yaml"}, "response_format.type"),
    ("json", "response_format"),
])
def test_chat_stream_refuses_a_bad_response_format(serve, response_format, param):
    url = mock_server(serve)
    r = httpx.post(f"{url}/chat_stream", json={"user_input": "hi", "response_format": response_format})
    assert r.status_code == 400 and f"'{param}'" in r.json()["message"], r.text


# -- OpenAI's published schemas ---------------------------------------------------------------------------

def _nullable(schema: Any) -> Any:
    """OpenAI's spec still marks null-able fields OpenAPI 3.0's way (``nullable: true``), which JSON Schema
    validators ignore: spell it as JSON Schema (``anyOf`` with ``null``)."""
    if isinstance(schema, list):
        return [_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _nullable(v) for k, v in schema.items() if k != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") is True else out


OPENAPI = _nullable(json.loads((FIXTURES / "openai_openapi_excerpt.json").read_text()))


def check_schema(instance: Any, name: str) -> None:
    """Validate against OpenAI's own component schema (tests/fixtures/openai_openapi_excerpt.json)."""
    import jsonschema

    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]})


def test_answers_validate_against_openais_published_schemas(serve):
    url = mock_server(serve, max_new_tokens=400)
    tools = {"messages": [{"role": "user", "content": CALL}], "tools": [WEATHER]}
    for body in ({"messages": USER}, {"messages": USER, "n": 2}, tools):
        whole = httpx.post(f"{url}/v1/chat/completions", json=body).json()
        check_schema(whole, "CreateChatCompletionResponse")
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            for chunk in sse_events(r.read().decode()):
                check_schema(chunk, "CreateChatCompletionStreamResponse")
    assert whole["choices"][0]["message"]["tool_calls"]  # the tool call answer was among those checked
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once", "max_tokens": 4})
    check_schema(r.json(), "CreateCompletionResponse")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once", "max_tokens": 4, "n": 2, "echo": True})
    check_schema(r.json(), "CreateCompletionResponse")
    # The spec has no stream schema for /v1/completions: its chunks are the completion object, with
    # finish_reason null until the last (as OpenAI's own stream sends them).
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once", "stream": True, "max_tokens": 4})
    chunks = sse_events(r.text)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    check_schema(chunks[-1], "CreateCompletionResponse")


_EVENT_SCHEMAS = {  # each Responses stream event's own schema in OpenAI's spec
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
}


def test_responses_models_and_errors_validate_against_openais_published_schemas(serve):
    url = mock_server(serve, max_new_tokens=400, api_key="k")
    auth = {"Authorization": "Bearer k"}
    seen: set[str] = set()
    for body in ({"input": "hello there", "instructions": "Be brief."},
                 {"input": "hello there", "max_output_tokens": 3},  # incomplete
                 {"input": CALL, "tools": [R_WEATHER]},  # a message, then a function_call item
                 {"input": "x", "text": {"format": {"type": "text"}}, "metadata": {"k": "v"}, "store": False}):
        whole = httpx.post(f"{url}/v1/responses", json=body, headers=auth).json()
        check_schema(whole, "Response")
        if whole["store"]:
            check_schema(httpx.get(f"{url}/v1/responses/{whole['id']}", headers=auth).json(), "Response")
        r = httpx.post(f"{url}/v1/responses", json={**body, "stream": True}, headers=auth, timeout=30)
        for event in sse_events(r.text):
            check_schema(event, _EVENT_SCHEMAS[event["type"]])
            seen.add(event["type"])
    assert seen == set(_EVENT_SCHEMAS) - {"response.failed"}
    # response.failed: a request that waits in the queue longer than --queue-timeout-s.
    busy = mock_server(serve, concurrency=1, queue_timeout_s=0.3, mock_token_delay=0.05)
    with httpx.stream("POST", f"{busy}/v1/chat/completions", json={"messages": USER, "stream": True}) as holding:
        lines = holding.iter_lines()
        next(lines)  # the only slot is taken (while `lines` lives: the stream stays open)
        r = httpx.post(f"{busy}/v1/responses", json={"input": "x", "stream": True}, timeout=30)
    (failed,) = [e for e in sse_events(r.text) if e["type"] == "response.failed"]
    check_schema(failed, "ResponseFailedEvent")
    assert "queue_timeout" in failed["response"]["error"]["message"]
    check_schema(httpx.get(f"{url}/v1/models", headers=auth).json(), "ListModelsResponse")
    check_schema(httpx.get(f"{url}/v1/models/mock", headers=auth).json(), "Model")
    for method, path, body in [("POST", "/v1/chat/completions", {"messages": USER, "top_k": -1}),
                               ("POST", "/v1/responses", {"input": "x", "previous_response_id": "resp_none"}),
                               ("POST", "/v1/completions", {"prompt": "x", "suffix": "y"}),
                               ("GET", "/v1/embeddings", None)]:
        r = httpx.request(method, url + path, json=body, headers=auth)
        assert r.status_code in (400, 404)
        check_schema(r.json(), "ErrorResponse")
    check_schema(httpx.get(f"{url}/v1/models").json(), "ErrorResponse")  # 401, no key


# -- a hostile client: every field of every /v1 endpoint --------------------------------------------------
# One mock server for the whole audit: each refusal is a 400 in OpenAI's shape naming the field, and
# none of them starts a turn (the turn and prompt-token counters do not move).

from chatstream.web.openai.completions import CompletionRequest  # noqa: E402
from chatstream.web.openai.protocol import ChatCompletionRequest, TokenizeRequest  # noqa: E402
from chatstream.web.openai.responses import ResponsesRequest  # noqa: E402

ENDPOINTS = {  # the smallest valid body of each, and its request model (to cover every field it accepts)
    "/v1/chat/completions": ({"messages": USER}, ChatCompletionRequest),
    "/v1/completions": ({"prompt": "hi"}, CompletionRequest),
    "/v1/responses": ({"input": "hi", "store": False}, ResponsesRequest),
    "/tokenize": ({"prompt": "hi"}, TokenizeRequest),
}
JUNK = ["x", "", 1.5, -1, 0, True, [], {}, 1 << 70, -1e308, [None], [[]], ["x"], [1], {"x": "y"}, {"type": "x"},
        {"a": {"b": [1, {"c": None}]}}, [{"a": {"b": [1]}}]]
NOWHERE = [{"a": {"b": [1, {"c": None}]}}, [{"a": {"b": [1]}}]]  # values no field of any endpoint takes


@pytest.fixture(scope="module")
def audit_server():
    from conftest import live_server

    app = create_app(Settings(mock=True, mock_token_delay=0.0, max_new_tokens=4, session_secret="audit",
                              session_store="memory://", concurrency=4, queue_size=8))
    with live_server(app) as server, httpx.Client(base_url=server.url, timeout=20) as http:
        yield http


def _turn_counters(http: httpx.Client) -> list[str]:
    return sorted(line for line in http.get("/metrics").text.splitlines()
                  if line.startswith(("chatstream_turns_total", "chatstream_prompt_tokens_total")))


def _refused(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["code"]
    return dict(error)


@pytest.mark.parametrize("path", ENDPOINTS)
def test_every_field_refuses_values_no_field_takes_naming_itself(audit_server, path):
    base, model = ENDPOINTS[path]
    before = _turn_counters(audit_server)
    checked = 0
    for field in model.model_fields:
        name = model.model_fields[field].alias or field
        for junk in NOWHERE:
            error = _refused(audit_server.post(path, json={**base, name: junk}))
            assert (error["param"] or "").startswith(name), (name, junk, error)
            checked += 1
    unknown = _refused(audit_server.post(path, json={**base, "temperature_": 1}))
    assert unknown["param"] == "temperature_" and unknown["code"] == "unknown_parameter"
    assert checked == 2 * len(model.model_fields) >= 6
    assert _turn_counters(audit_server) == before  # nothing started, nothing counted


@pytest.mark.parametrize("path", ENDPOINTS)
def test_every_field_with_any_junk_is_answered_never_5xx_or_422(audit_server, path):
    # Wrong types, out of range, huge, null, nested: either a valid value (200) or a 400 naming the field.
    base, model = ENDPOINTS[path]
    answered = {200: 0, 400: 0}
    for field in model.model_fields:
        name = model.model_fields[field].alias or field
        for junk in [*JUNK, None]:
            r = audit_server.post(path, json={**base, name: junk})
            assert r.status_code in answered, (name, junk, r.status_code, r.text[:300])
            answered[r.status_code] += 1
            if r.status_code == 400:
                assert (_refused(r)["param"] or "").startswith(name), (name, junk, r.text[:300])
    assert answered[400] > answered[200] > 0


@pytest.mark.parametrize("path, body, param", [
    # Nested junk names the deepest object the client sent that is wrong.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [None]}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f"}}]}]}, "messages[0].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
    ("/v1/chat/completions", {"messages": USER, "tools": [WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "get_weather"}, "x": 1}},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "tool_choice": 5}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {}, "strict": "yes"}}}, "response_format.json_schema.strict"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "no spaces", "schema": {}}}}, "response_format.json_schema.name"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": USER, "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"-5": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ("/v1/chat/completions", {"messages": USER, "metadata": {"k" * 65: "v"}}, "metadata"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a"] * 17}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "seed": 1 << 64}, "seed"),
    # Combinations.
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "n": 2, "logprobs": True}, "logprobs"),  # the mock has none
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "response_format": {"type": "json_object"}},
     "response_format"),  # the mock enforces no grammar: refused, not ignored
    ("/v1/completions", {"prompt": [""]}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [1 << 40]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 0}, "echo"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1234567890": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x" * 5000, "max_tokens": 3}, "prompt"),
    ("/v1/responses", {"input": ["hi"]}, "input"),
    ("/v1/responses", {"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ("/v1/responses", {"input": [{"role": "user", "content": []}]}, "input[0].content"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ("/v1/responses", {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ("/v1/responses", {"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[0].output"),
    ("/v1/responses", {"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ("/v1/responses", {"input": "x", "text": {"x": 1}}, "text.x"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "text", "x": 1}}}, "text.format.x"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "schema": {}, "strict": "yes"}}},
     "text.format.strict"),
    ("/v1/responses", {"input": "x", "text": {"verbosity": "high"}}, "text.verbosity"),
    ("/v1/responses", {"input": "x", "tools": [R_WEATHER], "tool_choice": {"type": "allowed_tools", "tools": []}},
     "tool_choice"),
    ("/v1/responses", {"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ("/v1/responses", {"input": "x", "truncation": "auto"}, "truncation"),
    ("/v1/responses", {"input": "x", "tools": [R_WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
    ("/v1/responses", {"input": "x" * 5000}, "input"),
    ("/v1/responses", {"input": "x", "instructions": "x" * 5000}, "input"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "x", "model": 5}, "model"),
    ("/tokenize", {"prompt": "x", "wat": 1}, "wat"),
])
def test_nested_junk_and_combinations_are_400_naming_the_field(audit_server, path, body, param):
    before = _turn_counters(audit_server)
    assert _refused(audit_server.post(path, json=body))["param"] == param
    assert _turn_counters(audit_server) == before


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": USER, "n": 2, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": USER, "n": 2, "tools": [WEATHER], "tool_choice": "auto"}),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "none"}),
    ("/v1/chat/completions", {"messages": USER, "stream": True, "stream_options": None}),
    ("/v1/chat/completions", {"messages": USER, "seed": (1 << 64) - 1, "max_tokens": 3, "max_completion_tokens": 3}),
    ("/v1/chat/completions", {"messages": USER, "metadata": {"k" * 64: "v" * 512}}),
    ("/v1/completions", {"prompt": "x", "n": 2, "echo": True, "stream": True}),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 3, "suffix": None}),
    ("/v1/responses", {"input": "x", "stream": True, "tools": [R_WEATHER], "store": False}),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "text"}}, "store": None}),
])
def test_combinations_that_ask_for_something_possible_are_answered(audit_server, path, body):
    r = audit_server.post(path, json=body)
    assert r.status_code == 200, r.text[:300]


def test_a_responses_input_beyond_the_context_is_context_length_exceeded(audit_server):
    error = _refused(audit_server.post("/v1/responses", json={"input": "x" * 5000, "max_output_tokens": 3}))
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "maximum context length is 4096 tokens" in error["message"]


def test_several_bad_fields_name_the_first_in_the_bodys_order(audit_server):
    # The body's own order decides (never the order the request model declares its fields in); a
    # missing required field comes after every bad field that is present.
    for first, second in [("temperature", "top_k"), ("top_k", "temperature"), ("n", "seed"), ("seed", "n")]:
        bad = {"temperature": 9, "top_k": -1, "n": 0, "seed": "s"}
        body = {first: bad[first], "messages": USER, second: bad[second]}
        assert _refused(audit_server.post("/v1/chat/completions", json=body))["param"] == first
    assert _refused(audit_server.post("/v1/completions", json={"top_p": 0, "echo": 1}))["param"] == "top_p"
    assert _refused(audit_server.post("/v1/completions", json={"echo": 1, "top_p": 0}))["param"] == "echo"
    assert _refused(audit_server.post("/v1/responses", json={"wat": 1, "temperature": 9, "input": "x"}))["param"] == "wat"


def test_a_4_mib_body_on_any_endpoint_leaves_the_event_loop_free(audit_server):
    # Large bodies are validated off the event loop, and what can never fit is refused before the
    # schema walks it (items beyond --max-messages, token ids beyond the context). Before, one such
    # request held every other stream for 0.5-1 s on this 2-core machine.
    text = [{"type": "input_text", "text": "hello world " * 3}]
    bodies = {"/v1/responses": ({"input": [{"role": "user", "content": text}] * 40000}, "input"),
              "/v1/completions": ({"prompt": list(range(100, 30000)) * 20}, "prompt"),
              "/v1/chat/completions": ({"messages": [{"role": "user", "content": "x" * 3_900_000}]}, "messages")}
    for path, (body, param) in bodies.items():
        since = time.time()
        content = json.dumps(body).encode()
        assert len(content) > 3_900_000
        r = audit_server.post(path, content=content, headers={"content-type": "application/json"})
        assert _refused(r)["param"] == param
        time.sleep(0.1)  # a few samples after the answer
        lag = audit_server.get("/stats/loop_lag", params={"since": since}).json()
        assert lag["samples"] >= 5 and lag["max_ms"] < 400, (path, lag)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("response_id", ["resp_" + "a" * 200, "msg_123", "resp_A-1", "resp_%00"])
def test_a_stored_response_is_asked_for_by_a_response_id(audit_server, method, response_id):
    r = audit_server.request(method, f"/v1/responses/{response_id}")
    assert _refused(r)["param"] == "response_id"
