"""The OpenAI surface on the embedded model through clients as installed: litellm (tools, ``n``,
streaming, structured output), and what needs the real sampler on /v1/completions (legacy
``logprobs``) and /v1/responses (a forced function call, streamed)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import LiveServer
from fastapi import FastAPI
from pydantic import BaseModel, Field
from test_openai_surface import check_schema

from chatstream import ChatStream
from chatstream.web.openai import add_openai_routes

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0, le=100_000_000)
    capital: bool


@pytest.fixture(scope="module")
def url(default_model: Any) -> Any:
    model, tokenizer = default_model
    chat_stream = ChatStream(model, tokenizer, temperature=1.0, max_new_tokens=120, context_len=1024,
                             model_name="smol", num_of_concurrent_executions=4, max_queue_size=20)
    app = FastAPI()
    add_openai_routes(app, chat_stream)
    server = LiveServer(app).start()
    yield server.url
    server.stop()
    asyncio.run(chat_stream.shutdown())  # gives the shared model its own layers back


@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list at import
    import litellm

    litellm.telemetry = False
    return litellm


def _ask(url: str) -> dict[str, Any]:
    return {"model": "openai/smol", "api_base": f"{url}/v1", "api_key": "unused", "timeout": 300,
            "num_retries": 0}


# -- litellm -----------------------------------------------------------------------------------------

def test_litellm_tools_whole_and_streamed(url, litellm):
    ask = {**_ask(url), "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 80, "seed": 5}
    (call,) = litellm.completion(**ask).choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(litellm.completion(**ask, stream=True))
    with_calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(with_calls) > 2  # the name, then the arguments as they were generated
    built = litellm.stream_chunk_builder(chunks, messages=ASK)
    (streamed,) = built.choices[0].message.tool_calls
    assert streamed.function.name == "get_weather" and built.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(streamed.function.arguments), WEATHER["function"]["parameters"])


def test_litellm_n_choices_and_streaming(url, litellm):
    ask = {**_ask(url), "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
           "temperature": 1.0, "seed": 11}
    reply = litellm.completion(**ask, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices) and reply.usage.completion_tokens > 0
    chunks = list(litellm.completion(**ask, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    built = litellm.stream_chunk_builder(chunks)
    assert text and built.choices[0].message.content == text and built.choices[0].finish_reason == "length"


def test_litellm_structured_output(url, litellm):
    ask = {**_ask(url), "messages": [{"role": "user", "content": "Describe a city as JSON."}], "max_tokens": 80,
           "seed": 2}
    reply = litellm.completion(**ask, response_format=City)
    City.model_validate_json(reply.choices[0].message.content)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    reply = litellm.completion(**ask, response_format={"type": "json_schema", "json_schema": {
        "name": "city", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


# -- /v1/completions logprobs ----------------------------------------------------------------------------

def test_completion_logprobs_in_the_legacy_form(url):
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    ask = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    whole = c.completions.create(**ask).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == whole.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert max(top, key=top.get) == token and top[token] == pytest.approx(logprob)  # greedy: the most likely
    check_schema(httpx.post(f"{url}/v1/completions", json=ask, timeout=300).json(), "CreateCompletionResponse")
    # Streamed, each chunk is the completion object with its share of the logprobs; the spec has no
    # chunk schema, and its finish_reason cannot be null, as it is (OpenAI's too) until the last chunk.
    r = httpx.post(f"{url}/v1/completions", json={**ask, "stream": True}, timeout=300)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks) == 5
    for chunk in chunks:
        choice = chunk["choices"][0]
        check_schema({**chunk, "choices": [{**choice, "finish_reason": choice["finish_reason"] or "length"}]},
                     "CreateCompletionResponse")
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(**ask, stream=True) if ch.choices]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    # n choices each carry their own; without logprobs there are none.
    two = c.completions.create(**{**ask, "n": 2, "temperature": 1.0, "seed": 1})
    assert all(len(ch.logprobs.tokens) == 5 for ch in two.choices)
    assert c.completions.create(**{**ask, "logprobs": None}).choices[0].logprobs is None


# -- /v1/responses, a forced call ---------------------------------------------------------------------------

def test_responses_required_tool_choice_streams_a_valid_call(url):
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    tool = {"type": "function", **WEATHER["function"]}
    with c.responses.stream(model="smol", input="What's the weather in Paris?", tools=[tool],
                            tool_choice="required", max_output_tokens=80) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    assert sum(1 for e in events if e.type == "response.function_call_arguments.delta") > 1
