"""Property-based fuzzing of the HTTP faces: whatever the body, cookies and headers, never a 5xx,
and a refused request (4xx) never changes the session."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import live_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstream import Settings
from chatstream.web.app import create_app

# JSON-ish values, including the awkward ones: huge ints, floats, unicode, lone surrogates, nesting.
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["", " ", "\ud800", "\x00", "😀" * 5, "a" * 9000]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)
_chat_fields = st.sampled_from(["user_input", "regenerate", "max_tokens", "temperature", "top_p", "top_k",
                                "seed", "stop", "repetition_penalty", "unknown"])
_chat_bodies = st.dictionaries(_chat_fields, _values, max_size=5)
_openai_fields = st.sampled_from(["messages", "model", "max_tokens", "max_completion_tokens", "temperature",
                                  "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "tools",
                                  "repetition_penalty", "user", "logprobs", "top_logprobs", "tool_choice",
                                  "response_format", "logit_bias", "min_p", "presence_penalty"])
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                            "content": _values}), max_size=4)
_openai_bodies = st.dictionaries(_openai_fields, st.one_of(_values, _messages), max_size=5)
_raw = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
_headers = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1",
                                     "application/x-www-form-urlencoded", "", "application/merge-patch+json"]),
    "accept": st.sampled_from(["text/plain", "text/event-stream", "*/*", "text/plain;q=0", "garbage;;q=x", ""]),
    "origin": st.sampled_from(["null", "https://evil.example", "http://127.0.0.1", "::::"]),
    "cookie": st.sampled_from(["chatstream_session=garbage", "a=b; chatstream_session=", "\x7f", "=;=;"]),
})


def _encode(body: Any) -> bytes:
    return json.dumps(body).encode("utf-8", "surrogatepass") if not isinstance(body, bytes) else body


@pytest.fixture(scope="module")
def fuzz_server():
    app = create_app(Settings(mock=True, mock_token_delay=0.0, max_new_tokens=4, session_secret="fuzz",
                              session_store="memory://", new_sessions_per_minute=0))
    with live_server(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/chat_stream", json={"user_input": "the history to keep"}).status_code == 200
        yield client


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(body=st.one_of(_chat_bodies, _raw), headers=_headers)
def test_chat_stream_never_5xx_and_a_refusal_changes_nothing(fuzz_server, body, headers):
    client = fuzz_server
    before = client.get("/history").json()
    r = client.post("/chat_stream", content=_encode(body), headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json()
        assert client.get("/history").json() == before


@_FUZZ
@given(body=st.one_of(_openai_bodies, _raw), headers=_headers,
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses"]))
def test_openai_never_5xx(fuzz_server, body, headers, path):
    if path != "/v1/chat/completions" and isinstance(body, dict):  # the other routes' main fields
        body = {("prompt" if path == "/v1/completions" else "input") if k == "messages" else k: v
                for k, v in body.items()}
    r = fuzz_server.post(path, content=_encode(body), headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "error" in r.json()


@_FUZZ
@given(body=st.one_of(st.dictionaries(st.sampled_from(["prompt", "model", "add_special_tokens", "x"]), _values,
                                      max_size=3), _raw), headers=_headers)
def test_tokenize_never_5xx(fuzz_server, body, headers):
    r = fuzz_server.post("/tokenize", content=_encode(body), headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300])


@_FUZZ
@given(path=st.sampled_from(["/history", "/clear_context", "/health", "/stats/loop_lag", "/v1/models", "/"]),
       query=st.text(max_size=30), headers=_headers)
def test_other_routes_never_5xx(fuzz_server, path, query, headers):
    method = "POST" if path == "/clear_context" else "GET"
    # A client of its own, so the session the other tests keep is never cleared here.
    r = httpx.request(method, f"{fuzz_server.base_url}{path}", params={"since": query}, headers=headers)
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
