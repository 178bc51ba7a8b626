"""A user message is accepted when its tokens fit the context, and refused in the user's terms when not.

The character cap is only a cheap first bound, derived from the context unless set.
"""

from __future__ import annotations

import httpx
from conftest import parse_sse

from chatstream import ChatService, Settings
from chatstream.web.app import create_app


def server_settings(tmp_path, **values) -> Settings:
    return Settings(session_store="memory://", session_secret="s", data_dir=str(tmp_path), **values)


def post(url: str, text: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/chat_stream", json={"user_input": text, **extra}, timeout=600)


def test_the_character_cap_follows_the_context(serve, tmp_path):
    # The mock counts a token per byte; its context here is 16,384 tokens.
    url = serve(create_app(server_settings(tmp_path, mock=True, mock_token_delay=0.001, context_len=16384))).url
    r = post(url, "x" * 12_000)  # over the old fixed cap of 8,000 characters, well within the context
    assert r.status_code == 200, r.text
    assert parse_sse(r.text)[-1][1]["status"] == "success"

    r = post(url, "x" * (16384 * 16 + 1))  # over 16 characters a token of the whole context: not even counted
    assert r.status_code == 413 and r.json()["error"] == "input_too_large"
    assert r.json()["message"] == "the message is 262,145 characters; this server takes at most 262,144"


def test_a_message_whose_tokens_do_not_fit_is_refused_naming_tokens_and_the_context(serve, tmp_path):
    url = serve(create_app(server_settings(tmp_path, mock=True, context_len=4096, max_new_tokens=256))).url
    r = post(url, "x" * 5000)
    assert r.status_code == 413 and r.json()["error"] == "input_too_large"
    message = r.json()["message"]
    assert "the message is too long: it takes 5,050 tokens" in message  # 5,000 bytes and the chat format
    assert "the model's context of 4,096 tokens leaves 3,840 for it after the 256 kept for the reply" in message
    assert httpx.get(f"{url}/history").json()["messages"] == []


def test_an_explicit_character_cap_still_applies(serve, tmp_path):
    url = serve(create_app(server_settings(tmp_path, mock=True, max_input_chars=100))).url
    r = post(url, "x" * 101)
    assert r.status_code == 413
    assert r.json()["message"] == "the message is 101 characters; this server takes at most 100"


def test_a_3000_token_question_is_answered_with_the_default_settings(serve, tmp_path, default_model):
    model, tokenizer = default_model
    cities = ["Amsterdam", "Barcelona", "Copenhagen", "Edinburgh", "Stockholm", "Helsinki", "Budapest", "Brussels"]
    question = "Which of these cities has the largest number? " + " ".join(
        f"{cities[n % 8]} {n * 7919 % 101}," for n in range(620))
    tokens = len(tokenizer.encode(question, add_special_tokens=False))
    assert len(question) > 8100 and 2900 <= tokens <= 3200, (len(question), tokens)
    # Every limit at its default; the stall deadline is raised only because this shared test machine
    # can take over a minute to prefill 3,000 tokens when it is busy.
    settings = server_settings(tmp_path, temperature=0.0, stall_timeout_s=600)
    service = ChatService(settings, model=model, tokenizer=tokenizer)
    assert service.context_len == 8192
    url = serve(create_app(settings, service)).url
    r = post(url, question, max_tokens=1)
    assert r.status_code == 200, r.text
    done = parse_sse(r.text)[-1][1]
    assert done["status"] == "success" and done["usage"]["prompt_tokens"] > tokens
