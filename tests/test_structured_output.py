"""Structured output and forced tool calls on the embedded model, through real clients (the openai SDK,
LangChain): the grammar is enforced token by token, so even a 135M model answers in the schema."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import LiveServer
from fastapi import FastAPI
from pydantic import BaseModel, Field
from test_openai_surface import check_schema

from chatstream import ChatStream, Settings
from chatstream.service import ChatService
from chatstream.web.openai import add_openai_routes
from chatstream.web.openai.tools import template_messages

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "doctor", "artist", "teacher"]},
        "retired": {"type": "boolean"},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 2},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "retired", "skills", "address"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def url(default_model: Any) -> Any:
    model, tokenizer = default_model
    chat_stream = ChatStream(model, tokenizer, temperature=1.0, max_new_tokens=160, context_len=1024,
                             model_name="smol", num_of_concurrent_executions=16, max_queue_size=200)
    app = FastAPI()
    add_openai_routes(app, chat_stream)
    chat_stream.append_apis(app)  # /chat_stream too, for the seed API's users
    chat_stream.append_middlewares(app)
    server = LiveServer(app).start()
    yield server.url
    server.stop()
    asyncio.run(chat_stream.shutdown())  # gives the shared model its own layers back


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.timeout(900)  # 100 replies of ~45 tokens: about 3 minutes on a loaded 2-core machine
def test_100_json_schema_replies_all_validate(url):
    async def ask(c: openai.AsyncOpenAI, seed: int) -> Any:
        reply = await c.chat.completions.create(
            model="smol", messages=ASK, seed=seed, max_tokens=160,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA,
                                                                    "strict": True}})
        return reply.choices[0]

    async def run_all() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as c:
            return await asyncio.gather(*(ask(c, seed) for seed in range(100)))

    choices = asyncio.run(run_all())
    valid = 0
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)
        valid += 1
    assert valid == 100
    assert len({c.message.content for c in choices}) > 50  # sampled: the seeds give different people


def test_json_object_mode_answers_an_object(url):
    reply = client(url).chat.completions.create(model="smol", messages=ASK, seed=3, max_tokens=160,
                                                response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":  # an object can be longer than max_tokens
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    role: Literal["engineer", "doctor", "artist", "teacher"]


def test_openai_parse_with_a_pydantic_model(url):
    parsed = client(url).chat.completions.parse(model="smol", messages=ASK, response_format=Person, seed=1)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_constrained_and_free_rows_share_the_engine(url):
    async def run_all() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as c:
            return await asyncio.gather(*(
                c.chat.completions.create(model="smol", messages=ASK, seed=i, max_tokens=40,
                                          **({"response_format": {"type": "json_schema", "json_schema": {
                                              "name": "p", "schema": PERSON_SCHEMA}}} if i % 2 else {}))
                for i in range(8)))

    replies = asyncio.run(run_all())
    for i, reply in enumerate(replies):
        text = reply.choices[0].message.content
        if i % 2 and reply.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(text), PERSON_SCHEMA)
        elif i % 2:
            assert text.startswith('{"name":"')
        else:
            assert text and not text.startswith('{"name":"')


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_returns_a_valid_call(url, stream):
    ask = {"model": "smol", "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
           "tools": [WEATHER, TIME], "tool_choice": "required", "seed": 5, "max_tokens": 80}
    if stream:
        chunks = list(client(url).chat.completions.create(**ask, stream=True))
        first, *fragments = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert first.id.startswith("call_") and first.function.arguments == ""  # the name first, as OpenAI's
        assert len(fragments) > 1  # then the arguments as they are generated
        name, arguments = first.function.name, "".join(d.function.arguments for d in fragments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        choice = client(url).chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    schema = {"get_weather": WEATHER, "get_time": TIME}[name]["function"]["parameters"]
    jsonschema.validate(json.loads(arguments), schema)


def test_a_named_tool_choice_calls_that_tool(url):
    choice = client(url).chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "hello"}], tools=[WEATHER, TIME], seed=2,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=80).choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments)["zone"], str)


def test_langchain_structured_output_and_bound_tools(url):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smol", base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300,
                     seed=4, max_completion_tokens=120)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Describe a person.")
    assert isinstance(person, Person)

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


def test_penalties_and_min_p_reach_the_sampler(url):
    # Greedy, so only the penalties can change the reply; in 32 tokens some token comes back, and a
    # penalty of 2 on it changes the argmax. (Which reply the model gives depends on the batch it
    # shared, so nothing here assumes a particular text.)
    ask = {"model": "smol", "prompt": "cat " * 12, "temperature": 0, "max_tokens": 32,
           "extra_body": {"repetition_penalty": 1.0}}
    plain = client(url).completions.create(**ask).choices[0].text
    assert Counter(plain.split()).most_common(1)[0][1] >= 2 or len(plain) > len(set(plain)), plain
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = client(url).completions.create(**ask, **extra).choices[0].text
        assert penalised != plain, (extra, plain)
    # min_p 1 keeps only the most likely token: sampling at any temperature becomes greedy.
    assert client(url).completions.create(**{**ask, "temperature": 1.5, "seed": 3, "extra_body": {
        "repetition_penalty": 1.0, "min_p": 1.0}}).choices[0].text == plain


def test_logprobs_come_from_the_samplers_distribution(url):
    ask = {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
           "temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    whole = client(url).chat.completions.create(**ask).choices[0]
    entries = whole.logprobs.content
    assert len(entries) == 6 and "".join(e.token for e in entries) == whole.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert bytes(entry.bytes).decode() == entry.token
    raw = httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=300).json()
    check_schema(raw, "CreateChatCompletionResponse")  # OpenAI's published schema, logprobs included
    r = httpx.post(f"{url}/v1/chat/completions", json={**ask, "stream": True}, timeout=300)
    raw_chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert sum(1 for c in raw_chunks if c["choices"] and c["choices"][0]["logprobs"]) >= 6
    for chunk in raw_chunks:
        check_schema(chunk, "CreateChatCompletionStreamResponse")
    chunks = list(client(url).chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 3)) for e in streamed] == [(e.token, round(e.logprob, 3)) for e in entries]
    # Under a grammar the distribution is the constrained one: the only allowed first token is '{'-led.
    constrained = client(url).chat.completions.create(
        **{**ask, "max_tokens": 2}, response_format={"type": "json_object"}).choices[0]
    first = constrained.logprobs.content[0]
    assert first.token.lstrip().startswith("{") and all(t.logprob < -100 or t.token.lstrip().startswith("{")
                                                        for t in first.top_logprobs)


def test_chat_stream_takes_a_response_format_too(url):
    r = httpx.post(f"{url}/chat_stream", headers={"Accept": "text/plain"}, timeout=300, json={
        "user_input": "Describe a person.", "seed": 9, "max_tokens": 160,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.text), PERSON_SCHEMA)


# A chat template that knows tools (as Llama 3.1's and Qwen's do): tools go into the last user turn,
# calls are written from their object arguments. The mock engine echoes that turn back.
TOOLS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'user' and loop.last and tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n"
    "{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}CALLED {{ c.function.name }} "
    "{{ c.function.arguments.city }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_knows_tools_renders_them_itself(serve, default_model):
    import copy

    tokenizer = copy.deepcopy(default_model[1])
    tokenizer.chat_template = TOOLS_TEMPLATE
    service = ChatService(Settings(mock=True, mock_token_delay=0.001), tokenizer=tokenizer)
    app = FastAPI()
    add_openai_routes(app, service)
    base = serve(app).url
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "rain"},
                {"role": "user", "content": "and tomorrow?"}]
    reply = client(base).chat.completions.create(model="m", messages=messages, tools=[WEATHER, TIME])
    assert reply.choices[0].message.content.startswith("You said: TOOLS get_weather,get_time\nand tomorrow?")
    # The call in the history reaches the template with its arguments as an object (not a JSON string),
    # and the tool message as a tool message.
    rendered = template_messages(
        [{"role": m["role"], "content": m["content"] or "", **{k: v for k, v in m.items() if k not in ("role", "content")}}
         for m in messages], [WEATHER, TIME], native=True)
    prompt = tokenizer.apply_chat_template(rendered, tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True)
    assert "CALLED get_weather Oslo" in prompt and "<|im_start|>tool\nrain" in prompt
