"""What only an engine enforces, through ``--engine-url``: the front forwards it, the upstream enforces it.

The upstream is a real ``chatstream serve`` with the embedded model (CI has no vLLM or llama.cpp
server; another chatstream is an OpenAI-compatible upstream like them). Greedy replies through the
front are compared with the same request sent to the upstream directly: the front answers exactly as
the engine would, structured output, forced tool calls, log-probabilities and logit bias included.
An upstream's 400 for a forwarded field reaches the client as a 400 naming the field, and the
upstream stays in rotation.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import LiveServer, parse_sse
from pydantic import BaseModel, Field
from test_cli import CHATSTREAM, free_port, wait_healthy

from chatstream import Settings
from chatstream.web.app import create_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "population": {"type": "integer", "minimum": 0}},
               "required": ["city", "population"], "additionalProperties": False}


class City(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0, le=100_000_000)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``chatstream serve`` with the embedded model, on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [CHATSTREAM, "serve", "--port", str(port), "--context-len", "2048", "--kv-cache-mb", "256",
         "--concurrency", "4", "--max-new-tokens", "200"],
        env={**os.environ, "CHATSTREAM_DATA_DIR": str(tmp_path_factory.mktemp("upstream"))},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=180)
        yield url
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def front(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(engine_url=[upstream], session_store="memory://", session_secret="s", concurrency=4,
                        max_new_tokens=200, data_dir=str(tmp_path_factory.mktemp("front")))
    server = LiveServer(create_app(settings)).start()
    wait_healthy(server.url, _Running(), timeout=60)
    yield server.url
    server.stop()


class _Running:
    """``wait_healthy`` wants a process; the front runs in this one."""

    def poll(self) -> None:
        return None


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _post(url: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=300)


def _stream_chunks(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def _same_answer(front: str, upstream: str, body: dict[str, Any]) -> dict[str, Any]:
    """The front's whole answer, checked equal (message, logprobs, finish reason) to the upstream's own.

    The upstream answers once first, so that both compared answers read the prompt from its prefix
    cache: a fresh prefill rounds differently (log-probabilities 0.03-0.09 apart, the same tokens)."""
    assert _post(upstream, body).status_code == 200
    via_front, direct = _post(front, body), _post(upstream, body)
    assert via_front.status_code == 200, via_front.text
    assert direct.status_code == 200, direct.text
    mine, theirs = via_front.json()["choices"][0], direct.json()["choices"][0]
    for choice in (mine, theirs):  # call ids are made up per answer
        for call in choice["message"].get("tool_calls") or []:
            call["id"] = "call"
    assert mine == theirs
    return via_front.json()


# -- structured output ------------------------------------------------------------------------------------

def test_openai_parse_with_a_pydantic_model(front, upstream):
    ask = {"model": "smol", "messages": [{"role": "user", "content": "Describe a city."}], "max_tokens": 80,
           "temperature": 0}
    parsed = _client(front).chat.completions.parse(**ask, response_format=City).choices[0].message.parsed
    assert isinstance(parsed, City)
    assert parsed == _client(upstream).chat.completions.parse(**ask, response_format=City).choices[0].message.parsed


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
])
def test_response_format_whole_and_streamed(front, upstream, response_format):
    body = {"messages": [{"role": "user", "content": "Describe Paris as JSON."}], "max_tokens": 60,
            "temperature": 0, "response_format": response_format}
    answer = _same_answer(front, upstream, body)
    value = json.loads(answer["choices"][0]["message"]["content"])
    jsonschema.validate(value, CITY_SCHEMA if response_format["type"] == "json_schema" else {"type": "object"})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in _stream_chunks(front, body) if c["choices"])
    assert streamed == answer["choices"][0]["message"]["content"]


def test_response_format_on_chat_stream(front):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}},
              "required": ["answer"], "additionalProperties": False}
    r = httpx.post(front + "/chat_stream", json={
        "user_input": "What is the capital of France?", "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}, timeout=300)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1][0] == "done", events[-1]
    jsonschema.validate(json.loads("".join(data["text"] for event, data in events if event == "delta")), schema)


def test_responses_text_format_json_schema(front):
    r = _post(front, {"input": "Describe Paris.", "max_output_tokens": 60, "temperature": 0,
                      "text": {"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA}}},
              path="/v1/responses")
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["output"][0]["content"][0]["text"]), CITY_SCHEMA)


# -- forced tool calls -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_whole_and_streamed(front, upstream, tool_choice):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    body = {"messages": ASK_WEATHER, "tools": [WEATHER, other], "tool_choice": tool_choice, "max_tokens": 60,
            "temperature": 0}
    answer = _same_answer(front, upstream, body)
    choice = answer["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    if isinstance(tool_choice, dict):
        assert call["function"]["name"] == "get_weather"
    if call["function"]["name"] == "get_weather":
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    chunks = _stream_chunks(front, body)
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == call["function"]["name"] and deltas[0]["id"].startswith("call_")
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == json.loads(call["function"]["arguments"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_results_in_the_history_reach_the_upstream(front, upstream):
    # The call and its result are written as text the upstream's model reads, as the local engine's
    # template does: the answer (greedy) is the same as the upstream's own.
    history = [*ASK_WEATHER,
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature_c\": 31}"}]
    answer = _same_answer(front, upstream, {"messages": history, "tools": [WEATHER], "max_tokens": 30,
                                            "temperature": 0})
    assert answer["choices"][0]["message"]["content"]


# -- logprobs and logit_bias ------------------------------------------------------------------------------

def test_logprobs_whole_and_streamed(front, upstream):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    answer = _same_answer(front, upstream, body)
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 and "".join(t["token"] for t in content) == answer["choices"][0]["message"]["content"]
    for token in content:
        assert len(token["top_logprobs"]) == 2 and token["top_logprobs"][0]["token"] == token["token"]
        assert token["logprob"] <= 0 and bytes(token["bytes"]).decode() == token["token"]
    streamed = [t for c in _stream_chunks(front, body) if c["choices"] and c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    sdk = _client(front).chat.completions.create(model="smol", **body).choices[0].logprobs.content
    assert [t.token for t in sdk] == [t["token"] for t in content]


def test_logit_bias(front, upstream):
    tokens = httpx.post(upstream + "/tokenize", json={"prompt": " banana"}).json()["tokens"]
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0,
            "logit_bias": {str(tokens[0]): 100}}
    answer = _same_answer(front, upstream, body)
    text = answer["choices"][0]["message"]["content"]
    unbiased = _post(front, {**body, "logit_bias": None}).json()["choices"][0]["message"]["content"]
    assert text != unbiased and text.count(text[: len(text) // 4]) >= 2  # one token over and over


# -- a refusal is the client's 400 ----------------------------------------------------------------------------

def test_an_upstream_400_for_a_forwarded_field_is_a_400_naming_it(front):
    # The front has no vocabulary size (it counts tokens on the upstream), so this id passes it; the
    # upstream refuses it.
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logit_bias": {"999999": 5}}
    r = _post(front, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "logit_bias" and error["type"] == "invalid_request_error"
    assert "'logit_bias'" in error["message"] and "vocabulary" in error["message"]
    # Streamed too (the status waits for the upstream's answer), and with n choices.
    for ask in ({**body, "stream": True}, {**body, "stream": True, "n": 2}, {**body, "n": 2}):
        r = _post(front, ask)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", (ask, r.text)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            list(_client(front).chat.completions.create(model="smol", **body, stream=stream))
    # Not the upstream's failure: it stays in rotation, unharmed, and serves the next request.
    (state,) = httpx.get(front + "/health").json()["upstreams"]
    assert state["healthy"] and state["failures"] == 0
    assert _post(front, {**body, "logit_bias": None}).status_code == 200
