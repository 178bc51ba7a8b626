"""chatstream in front of other engines (``--engine-url``): real upstream servers on loopback.

The upstreams are real processes: ``chatstream serve --mock`` (an OpenAI-compatible server with
a ``/health`` that counts running generations) and ``transformers serve`` on the embedded
model. The front keeps sessions, the queue, the seed API's callbacks; generation is remote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import parse_sse, wait_until
from seed_apps import callback_app
from test_cli import CHATSTREAM, free_port, wait_healthy

from chatstream import ChatStream
from chatstream.service import ChatService
from chatstream.settings import Settings
from chatstream.web.app import create_app

TRANSFORMERS = str(Path(CHATSTREAM).with_name("transformers"))


class Upstream:
    """A ``chatstream serve --mock`` process: the upstream engine."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def running(self) -> int:
        return int(self.health()["running"])


@pytest.fixture
def start_upstream(tmp_path: Path) -> Iterator[Callable[..., Upstream]]:
    """``start_upstream(*flags)`` runs ``chatstream serve --mock`` on a free port; all are stopped afterwards."""
    procs: list[subprocess.Popen] = []

    def start(*flags: str, port: int | None = None, token_delay: float = 0.02) -> Upstream:
        port = port or free_port()
        data_dir = tmp_path / f"upstream-{port}-{len(procs)}"
        proc = subprocess.Popen(
            [CHATSTREAM, "serve", "--mock", "--port", str(port), "--mock-token-delay", str(token_delay), *flags],
            env={**os.environ, "CHATSTREAM_DATA_DIR": str(data_dir)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout=60)
        return Upstream(proc, url)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def front_settings(*urls: str, **fields: Any) -> Settings:
    return Settings(engine_url=list(urls), **fields)


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The SSE events of a streaming response, as they arrive."""
    event = "message"
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line[5:])
            event = "message"


def reply_of(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(data["text"] for event, data in events if event == "delta")


# -- chatstream in front of chatstream --

async def test_front_streams_keeps_history_reports_queue_and_calls_back(start_upstream, serve):
    upstream = start_upstream(token_delay=0.05)
    calls: list[tuple[str, str]] = []
    chat_stream = ChatStream(service=ChatService.from_settings(front_settings(upstream.url, concurrency=1)))
    app = callback_app(chat_stream, calls)
    chat_stream.append_apis(app)  # /history and /health beside the seed endpoint
    chat_stream.append_openai_apis(app)
    front = serve(app)

    streaming = asyncio.Event()

    async def turn(client: httpx.AsyncClient, text: str) -> list[tuple[str, dict[str, Any]]]:
        async with client.stream("POST", "/chat_stream", json={"user_input": text, "regenerate": False}) as r:
            assert r.status_code == 200, await r.aread()
            events = []
            async for event in sse_events(r):
                events.append(event)
                streaming.set()
            return events

    async with httpx.AsyncClient(base_url=front.url, timeout=30) as alice, \
            httpx.AsyncClient(base_url=front.url, timeout=30) as bob:
        first = asyncio.create_task(turn(alice, "hello from alice"))
        await asyncio.wait_for(streaming.wait(), 30)  # alice holds the only slot (not a timed sleep: a busy machine)
        second = asyncio.create_task(turn(bob, "hello from bob"))
        a_events, b_events = await asyncio.gather(first, second)
        history = (await alice.get("/history")).json()
        health = (await alice.get("/health")).json()
        completion = (await alice.post("/v1/chat/completions", json={"messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "stateless one"}]})).json()

    assert reply_of(a_events).startswith("You said: hello from alice")
    assert reply_of(b_events).startswith("You said: hello from bob")
    assert a_events[-1][0] == b_events[-1][0] == "done"
    assert ("queued", {"position": 1}) in b_events  # the front's own queue, positions and all
    messages = history["messages"]
    assert messages == [{"role": "user", "content": "hello from alice"},
                        {"role": "assistant", "content": reply_of(a_events)}]
    assert wait_until(lambda: len(calls) == 2)
    assert [outcome for outcome, _ in calls] == ["success", "success"]
    assert any(reply_of(a_events) in prompt for _, prompt in calls)
    assert health["model"] == "mock"  # the upstream's model name
    assert completion["model"] == "mock"
    assert completion["choices"][0]["message"]["content"].startswith("You said: stateless one")
    assert [u["healthy"] for u in health["upstreams"]] == [True]


async def test_client_disconnect_closes_the_upstream_stream_at_once(start_upstream, serve):
    upstream = start_upstream(token_delay=0.3)  # the whole reply would take several seconds
    front = serve(create_app(front_settings(upstream.url)))
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as client:
        async with client.stream("POST", "/chat_stream", json={"user_input": "a long one please"}) as r:
            async for event, _ in sse_events(r):
                if event == "delta":
                    break
            assert upstream.running() == 1
    # The front cancelled the turn and closed the upstream connection: the upstream freed its slot.
    assert wait_until(lambda: upstream.running() == 0, timeout=3, interval=0.05)


async def test_upstream_dying_mid_stream_ends_with_an_error_and_saves_the_partial_reply(start_upstream, serve):
    upstream = start_upstream(token_delay=0.2)
    front = serve(create_app(front_settings(upstream.url)))
    events: list[tuple[str, dict[str, Any]]] = []
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as client:
        async with client.stream("POST", "/chat_stream", json={"user_input": "tell me more"}) as r:
            async for event, data in sse_events(r):
                events.append((event, data))
                if event == "delta" and len(events) == 3:
                    upstream.proc.kill()
        history = (await client.get("/history")).json()
    assert events[-1][0] == "error"
    assert "upstream" in events[-1][1]["message"]
    partial = reply_of(events)
    assert partial.startswith("You said:") and "Anything else?" not in partial
    messages = history["messages"]
    assert messages[-1] == {"role": "assistant", "content": partial}


def test_two_upstreams_share_the_load_and_a_dead_one_is_ejected_and_retried_around(start_upstream, tmp_path):
    a = start_upstream(token_delay=0.1)
    b = start_upstream(token_delay=0.1)
    port = free_port()
    # The real CLI, with the repeatable flag; health checks far apart, so that only a failing
    # request can find out that an upstream died.
    front = subprocess.Popen(
        [CHATSTREAM, "serve", "--engine-url", a.url, "--engine-url", b.url, "--engine-health-interval-s", "600",
         "--concurrency", "4", "--port", str(port)],
        env={**os.environ, "CHATSTREAM_DATA_DIR": str(tmp_path / "front")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert [u["healthy"] for u in wait_healthy(url, front).json()["upstreams"]] == [True, True]
        results: list[str] = []

        def ask(text: str) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                results.append(client.post("/chat_stream", json={"user_input": text}).text)

        threads = [threading.Thread(target=ask, args=(f"question {i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        # Least outstanding requests: four at once are two on each upstream.
        assert wait_until(lambda: (a.running(), b.running()) == (2, 2), timeout=10, interval=0.05)
        for thread in threads:
            thread.join(timeout=30)
        assert [parse_sse(r)[-1][0] for r in results] == ["done"] * 4

        a.proc.kill()
        a.proc.wait(timeout=10)
        # The next requests still succeed: the one routed to the dead upstream had streamed
        # nothing yet, so it was retried on the other one.
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(4):
                events = parse_sse(client.post("/chat_stream", json={"user_input": f"after {i}"}).text)
                assert events[-1][0] == "done", events[-1]
                assert reply_of(events).startswith(f"You said: after {i}")
            upstreams = client.get("/health").json()["upstreams"]
            metrics = client.get("/metrics").text
        dead, alive = upstreams
        assert dead["healthy"] is False and dead["failures"] >= 1
        assert alive["healthy"] is True and alive["failures"] == 0
        assert f'chatstream_upstream_healthy{{upstream="{a.url}"}} 0.0' in metrics
        assert f'chatstream_upstream_healthy{{upstream="{b.url}"}} 1.0' in metrics
    finally:
        front.terminate()
        front.communicate(timeout=20)


async def test_health_checks_follow_an_upstream_going_down_and_coming_back(start_upstream, serve):
    port = free_port()
    upstream = start_upstream(port=port)
    front = serve(create_app(front_settings(upstream.url, engine_health_interval_s=0.2)))
    async with httpx.AsyncClient(base_url=front.url, timeout=30) as client:
        assert (await client.get("/health")).status_code == 200
        upstream.proc.terminate()
        upstream.proc.communicate(timeout=20)
        assert await _eventually(lambda: client.get("/health"), lambda r: r.status_code == 503)
        refused = await client.post("/chat_stream", json={"user_input": "anyone there?"})
        assert refused.status_code == 503
        start_upstream(port=port)
        assert await _eventually(lambda: client.get("/health"), lambda r: r.status_code == 200)
        events = parse_sse((await client.post("/chat_stream", json={"user_input": "back again"})).text)
    assert events[-1][0] == "done"


async def _eventually(call: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(await call()):
            return True
        await asyncio.sleep(0.05)
    return False


# -- truncation to the context --

_LONG = "the quick brown fox jumps over the lazy dog " * 7  # about 310 bytes, 63 tokens


async def test_truncation_counts_with_the_local_tokenizer(start_upstream, serve):
    from chatstream.model_loader import resolve_model_folder

    # The upstream (byte-level mock tokenizer) refuses prompts over 1100 - 32 bytes, so the turns
    # below only succeed if the front dropped old turns. And it counts with the model's tokenizer
    # (about 5 bytes per token), not bytes: in bytes, one message alone would not fit in 168.
    upstream = start_upstream("--context-len", "1100")
    settings = front_settings(upstream.url, tokenizer=str(resolve_model_folder()), context_len=200, max_new_tokens=32)
    front = serve(create_app(settings))
    await _four_long_turns_succeed(front.url)


async def test_truncation_counts_with_the_upstream_tokenize_endpoint(start_upstream, serve):
    # Without --tokenizer the front counts on the upstream's POST /tokenize (here: bytes). Its budget,
    # 1000 - 32, fits the upstream's 1100 - 32 only when counted exactly; the fallback estimate
    # (half the bytes) would keep twice as much and the upstream would refuse.
    upstream = start_upstream("--context-len", "1100")
    front = serve(create_app(front_settings(upstream.url, context_len=1000, max_new_tokens=32)))
    await _four_long_turns_succeed(front.url)
    upstream.proc.terminate()
    log, _ = upstream.proc.communicate(timeout=20)
    assert '"POST /tokenize HTTP/1.1" 200' in log


async def _four_long_turns_succeed(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for i in range(4):
            events = parse_sse((await client.post("/chat_stream", json={"user_input": f"{i}: {_LONG}"})).text)
            assert events[-1][0] == "done", events[-1]
            assert events[-1][1]["usage"]["prompt_tokens"] <= 1100 - 32  # as the upstream counted it
        history = (await client.get("/history")).json()
    messages = history["messages"]
    assert len(messages) == 8  # truncation drops turns from the prompt, never from the history


def test_chatstream_answers_tokenize_like_vllm(start_upstream):
    upstream = start_upstream("--served-model-name", "mock")  # without it, any model name is accepted
    r = httpx.post(f"{upstream.url}/tokenize", json={"model": "mock", "prompt": "héllo"})
    assert r.status_code == 200
    assert r.json()["tokens"] == list("héllo".encode()) and r.json()["count"] == 6
    assert httpx.post(f"{upstream.url}/tokenize", json={"prompt": 3}).status_code == 400
    assert httpx.post(f"{upstream.url}/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404


def test_engine_urls_from_flags_or_environment(monkeypatch):
    monkeypatch.setenv("CHATSTREAM_ENGINE_URL", "http://10.0.0.1:8001, http://10.0.0.2:8001/v1")
    assert Settings().engine_url == ["http://10.0.0.1:8001", "http://10.0.0.2:8001/v1"]
    monkeypatch.setenv("CHATSTREAM_ENGINE_URL", '["http://10.0.0.3:8001"]')
    assert Settings().engine_url == ["http://10.0.0.3:8001"]
    with pytest.raises(ValueError, match="excludes --mock"):
        Settings(engine_url=["http://127.0.0.1:1"], mock=True)
    with pytest.raises(ValueError, match="not an http"):
        Settings(engine_url=["127.0.0.1:8001"])


# -- a third-party upstream --

@pytest.mark.slow_peer
def test_transformers_serve_as_the_upstream(serve, tmp_path):
    from chatstream.model_loader import resolve_model_folder

    folder = str(resolve_model_folder())
    port = free_port()
    started = time.monotonic()
    with open(tmp_path / "transformers-serve.log", "wb") as log:
        proc = subprocess.Popen(
            [TRANSFORMERS, "serve", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
             "--port", str(port), folder], stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        def models_listed() -> bool:
            assert proc.poll() is None, (tmp_path / "transformers-serve.log").read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
            return False

        assert wait_until(models_listed, timeout=180, interval=0.5), "transformers serve did not start"
        # Default sampling sends top_k and repetition_penalty, which transformers serve refuses
        # (422): the front retries without them. It has no /tokenize: counting is estimated.
        front = serve(create_app(front_settings(url, max_new_tokens=8, temperature=0.0)))
        with httpx.Client(base_url=front.url, timeout=120) as client:
            events = parse_sse(client.post("/chat_stream", json={"user_input": "Say hello."}).text)
            history = client.get("/history").json()
            models = client.get("/v1/models").json()
        assert events[-1][0] == "done", events[-1]
        assert events[-1][1]["finish_reason"] in ("stop", "length")
        assert 1 <= events[-1][1]["usage"]["completion_tokens"] <= 8
        reply = reply_of(events)
        assert reply.strip()
        messages = history["messages"]
        assert messages == [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": reply}]
        assert models["data"][0]["id"] == folder  # the upstream's model name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"transformers serve test took {time.monotonic() - started:.1f} s")
