"""A tool whose ``parameters`` is not valid JSON Schema is refused whatever ``tool_choice`` is, with a
400 naming the tool's field (as OpenAI does). It used to be accepted with ``auto`` (only shown to the
model) and refused only when forced. Valid tools, Open WebUI's 36 among them, are still served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatstream import Settings
from chatstream.web.app import create_app

USER = [{"role": "user", "content": "hi"}]
GOOD = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
BAD_SCHEMAS = [
    ({"type": "bogus"}, "Invalid type: bogus"),
    ({"type": "object", "required": "city"}, "Expected array for 'required'"),
    ({"type": "object", "properties": {"city": {"type": "string", "pattern": "("}}}, "regex parse error"),
    ({"$ref": "#/$defs/missing"}, "does not exist"),
]


def chat_tool(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": function}


@pytest.fixture(scope="module")
def url() -> Any:
    from conftest import live_server

    # The mock tokenizer counts a token a byte: Open WebUI's 26 KB of tools need a real model's context.
    with live_server(create_app(Settings(mock=True, context_len=1 << 16))) as server:
        yield server.url


@pytest.mark.parametrize("schema, problem", BAD_SCHEMAS)
@pytest.mark.parametrize("tool_choice", [None, "auto", "none", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_whose_parameters_are_not_json_schema_is_refused_naming_it(url: str, schema: Any, problem: str,
                                                                           tool_choice: Any) -> None:
    body: dict[str, Any] = {"messages": USER, "tools": [chat_tool(GOOD), chat_tool({"name": "bad", "parameters": schema})]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools[1].function.parameters" and error["code"] == "invalid_value"
    assert error["message"].startswith("Invalid value for 'tools[1].function.parameters': not a valid JSON schema: ")
    assert problem in error["message"]


@pytest.mark.parametrize("schema, problem", BAD_SCHEMAS[:2])
def test_the_responses_api_refuses_them_too(url: str, schema: Any, problem: str) -> None:
    r = httpx.post(f"{url}/v1/responses", timeout=30, json={
        "input": "hi", "tools": [{"type": "function", **GOOD}, {"type": "function", "name": "bad", "parameters": schema}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools[1].parameters" and problem in error["message"]


def test_a_forced_tool_still_names_tool_choice(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "messages": USER, "tools": [chat_tool({"name": "bad", "parameters": {"type": "bogus"}})], "tool_choice": "required"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tool_choice"
    assert r.json()["error"]["message"] == "Invalid value for 'tool_choice': the JSON schema cannot be enforced: Invalid type: bogus."


def test_valid_tools_are_served_open_webuis_36_among_them(url: str) -> None:
    body = json.loads((Path(__file__).parent / "fixtures" / "openwebui" / "chat_first_message.json").read_text())
    for request in ({**body, "stream": False}, {"messages": USER, "tools": [chat_tool(GOOD)], "tool_choice": "auto"},
                    {"messages": USER, "tools": [chat_tool({"name": "no_parameters"})]}):
        r = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("You said:")
