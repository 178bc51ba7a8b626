"""The whole path on the real embedded default model: HTTP in, tokens out, history saved."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import parse_sse, wait_until
from seed_apps import callback_app

from chatstream import ChatStream


@pytest.fixture(scope="module")
def real_server(default_model):
    from conftest import live_server

    model, tokenizer = default_model
    chat_stream = ChatStream(
        model=model, tokenizer=tokenizer, device="cpu", num_of_concurrent_executions=2,
        max_queue_size=4, max_new_tokens=24, temperature=0.0, repetition_penalty=1.0, session_secret="real",
    )
    calls: list = []
    app = callback_app(chat_stream, calls)
    chat_stream.append_apis(app)
    with live_server(app) as server:
        yield server, chat_stream, calls
    asyncio.run(chat_stream.shutdown())  # gives the shared model its own layers back


def test_a_real_reply_streams_token_by_token_and_lands_in_history(real_server):
    server, chat_stream, calls = real_server
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/chat_stream", json={"user_input": "What is the capital of France?", "regenerate": False})
        events = parse_sse(r.text)
        pieces = [d["text"] for e, d in events if e == "delta"]
        reply = "".join(pieces)
        assert len(pieces) > 3  # streamed in many pieces, not at once
        assert "Paris" in reply
        done = events[-1][1]
        assert done["status"] == "success" and done["usage"]["completion_tokens"] <= 24
        assert c.get("/history").json()["messages"][-1] == {"role": "assistant", "content": reply}
    assert wait_until(lambda: calls and calls[-1][0] == "success")
    assert calls[-1][1].rstrip().endswith(reply + "<|im_end|>")


def test_only_the_server_freezes_the_loaded_model_out_of_garbage_collection(default_model, serve):
    import gc

    from chatstream import ChatService, Settings
    from chatstream.web.app import create_app

    model, tokenizer = default_model
    before = gc.get_freeze_count()
    library = ChatStream(model=model, tokenizer=tokenizer)  # a library object: no process-wide side effect
    assert gc.get_freeze_count() == before
    asyncio.run(library.shutdown())  # gives the shared model its own layers back
    # The server freezes the model's objects once loaded, so a full collection never walks them
    # on the event loop.
    settings = Settings(session_secret="s")
    serve(create_app(settings, ChatService(settings, model=model, tokenizer=tokenizer)))
    assert wait_until(lambda: gc.get_freeze_count() > 100_000, timeout=10)


def test_multibyte_text_streams_without_broken_characters(real_server):
    server, _, _ = real_server
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # A prompt whose greedy reply has Japanese on the int8 path the server now always takes
        # ("Write 'こんにちは' three times." got Japanese only when a start-up timing chose float32).
        r = c.post("/chat_stream", json={"user_input": "Repeat exactly: こんにちは", "max_tokens": 24})
        pieces = [d["text"] for e, d in parse_sse(r.text) if e == "delta"]
        stored = c.get("/history").json()["messages"][-1]["content"]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == stored
    assert any(ord(ch) > 0x3000 for ch in stored)  # the reply really contains multi-byte text


def test_leaving_mid_stream_frees_the_slot_at_once(real_server):
    server, chat_stream, calls = real_server
    before = len(calls)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/chat_stream", json={"user_input": "Write a long story about a dragon."}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and "text" in json.loads(line[5:]):
                    break
        assert wait_until(lambda: len(calls) > before, timeout=10)
        assert calls[-1][0] == "client_disconnected_while_streaming"
        assert chat_stream.admission.running == 0
        assert wait_until(lambda: chat_stream.engine.num_running == 0, timeout=2)
        assert c.get("/history").json()["messages"][-1]["role"] == "assistant"


def test_health_and_metrics_name_the_backend(real_server):
    server, chat_stream, _ = real_server
    with httpx.Client(base_url=server.url, timeout=60) as c:
        health = c.get("/health").json()
        backend = health["backend"]
        metrics = c.get("/metrics").text
    assert backend["forward"] in ("fused", "hf") and backend["ops"] in ("native", "torch")
    assert backend["linear"] in ("float", "int8-vnni", "int8-intmm") and backend["device"] == "cpu"
    assert f'forward="{backend["forward"]}"' in metrics and "chatstream_engine_backend_info{" in metrics
    # The KV cache's element type, and what a token of it takes (SmolLM2-135M: 30 layers x 3 KV heads x 64).
    width = {"float32": 4, "float16": 2, "bfloat16": 2}[backend["kv_dtype"]]
    assert health["kv_cache"]["bytes_per_token"] == 2 * 30 * 3 * 64 * width and health["kv_cache"]["blocks"] > 0
    assert f'kv_dtype="{backend["kv_dtype"]}"' in metrics
