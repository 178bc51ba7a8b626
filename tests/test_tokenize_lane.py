"""``POST /tokenize`` is bounded by --max-body-bytes and never holds chat turns back.

Tokenizing runs off the event loop one at a time, but in its own lane: the turns' prompts do not
wait behind it. Under load, a turn started while /tokenize calls run ends before they do. With a
remote engine, counting a turn's tokens waits on the upstream's /tokenize: a slow answer for one
turn must not hold the others back either.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
from conftest import parse_sse, wait_until
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_remote_containment import FakeUpstream

from chatstream import ChatService, Settings
from chatstream.web.app import create_app


class SlowTokenizeUpstream(FakeUpstream):
    """The fake upstream with vLLM's /tokenize, which answers any text saying "slow" only once the
    test sets ``release`` (``waiting`` is set meanwhile): the order of events does not hang on timing."""

    def __init__(self) -> None:
        super().__init__()
        self.app.router.routes.append(Route("/tokenize", self.tokenize, methods=["POST"]))
        self.waiting = threading.Event()
        self.release = threading.Event()

    async def tokenize(self, request: Request) -> JSONResponse:
        text = (await request.json())["prompt"]
        if "slow" in text:
            self.waiting.set()
            deadline = time.monotonic() + 60
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        return JSONResponse({"tokens": [1] * len(text.split()), "count": len(text.split())})


def finished_at(call: Any, results: dict[str, float], name: str) -> threading.Thread:
    def run() -> None:
        call()
        results[name] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def a_turn(url: str, text: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        events = parse_sse(client.post("/chat_stream", json={"user_input": text}).text)
    assert events[-1][0] == "done", events


def remote_front(serve: Any) -> tuple[str, SlowTokenizeUpstream]:
    fake = SlowTokenizeUpstream()
    upstream = serve(fake.app).url
    settings = Settings(engine_url=[upstream], session_store="memory://", session_secret="s", concurrency=4)
    url: str = serve(create_app(settings)).url
    assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=30)
    return url, fake


def test_a_slow_tokenize_call_does_not_queue_turns(serve):
    url, upstream = remote_front(serve)
    done: dict[str, float] = {}
    tokenize = finished_at(lambda: httpx.post(url + "/tokenize", json={"prompt": "slow words"}, timeout=90)
                           .raise_for_status(), done, "tokenize")
    try:
        assert upstream.waiting.wait(30)  # the /tokenize call is waiting on the upstream
        a_turn(url, "hello")  # queued behind it, this would time out
        assert "tokenize" not in done
    finally:
        upstream.release.set()
        tokenize.join()
    assert "tokenize" in done


def test_one_turn_whose_counting_is_slow_does_not_hold_another_back(serve):
    url, upstream = remote_front(serve)
    done: dict[str, float] = {}
    slow = finished_at(lambda: a_turn(url, "slow words"), done, "slow")
    try:
        assert upstream.waiting.wait(30)  # the slow turn's counting is waiting on the upstream
        a_turn(url, "hello")
        assert "slow" not in done
    finally:
        upstream.release.set()
        slow.join()
    assert "slow" in done


def test_large_tokenize_calls_under_load_do_not_delay_turns(serve, default_model):
    _, tokenizer = default_model
    settings = Settings(mock=True, mock_token_delay=0.001, session_store="memory://", session_secret="s",
                        max_body_bytes=2 * 2**20)
    url = serve(create_app(settings, ChatService(settings, tokenizer=tokenizer))).url
    big = ("The quick brown fox jumps over the lazy dog. " * 40_000)[:1_500_000]
    done: dict[str, float] = {}
    calls = [finished_at(lambda: httpx.post(url + "/tokenize", json={"prompt": big}, timeout=120)
                         .raise_for_status(), done, f"tokenize {i}") for i in range(2)]
    time.sleep(0.5)  # the first is tokenizing, the second waits for it
    turn = finished_at(lambda: a_turn(url, "hello"), done, "turn")
    for thread in [*calls, turn]:
        thread.join()
    assert done["turn"] < min(done["tokenize 0"], done["tokenize 1"])
    # Bounded by --max-body-bytes, like every body.
    too_big = httpx.post(url + "/tokenize", json={"prompt": big + big}, timeout=60)
    assert too_big.status_code == 413


class EverySlowTokenizeUpstream(FakeUpstream):
    """The fake upstream whose /tokenize takes ``delay_s`` for every text, as a loaded vLLM might."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.app.router.routes.append(Route("/tokenize", self.tokenize, methods=["POST"]))
        self.delay_s = delay_s

    async def tokenize(self, request: Request) -> JSONResponse:
        text = (await request.json())["prompt"]
        await asyncio.sleep(self.delay_s)
        return JSONResponse({"tokens": [1] * len(text.split()), "count": len(text.split())})


def test_a_slow_upstream_tokenize_never_holds_the_event_loop(serve):
    # The first /chat_stream turn also tokenizes the server's own prompt head (twice); that ran on
    # the event loop, so with a 1.5 s /tokenize every request waited ~3 s (and with a 4 s one, every
    # streaming turn's 5 s lease ran out: all four turns in flight ended with lease_lost).
    upstream = serve(EverySlowTokenizeUpstream(delay_s=1.5).app).url
    settings = Settings(engine_url=[upstream], session_store="memory://", session_secret="s", concurrency=4)
    url = serve(create_app(settings)).url
    assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=30)
    done: dict[str, float] = {}
    turn = finished_at(lambda: a_turn(url, "hello"), done, "turn")
    probes: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as prober:
        while "turn" not in done and turn.is_alive():
            started = time.monotonic()
            assert prober.get("/health/live").status_code == 200
            probes.append(time.monotonic() - started)
            time.sleep(0.05)
    turn.join()
    assert "turn" in done and len(probes) > 10
    assert max(probes) < 1.0, f"the event loop was held {max(probes):.1f} s"
