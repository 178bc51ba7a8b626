"""Load generator: N concurrent clients streaming chat replies from one running server.

Each simulated client has its own ``httpx.AsyncClient`` (its own connection and cookie jar, so a
chatstream server sees N sessions) and sends its requests one after another, reading every
stream as it arrives. Two protocols:

* ``chatstream``: ``POST /chat_stream`` with Server-Sent Events back (see
  ``/work/shared/ARCHITECTURE.md``); ``POST /clear_context`` before each request keeps prompts
  from growing with the session's history (``--keep-context`` turns that off).
* ``openai``: ``POST /v1/chat/completions`` with ``"stream": true``; ``data: {...}`` chunks until
  ``data: [DONE]`` (or until the stream closes after a chunk with a ``finish_reason``, which is
  how ``transformers serve`` ends its streams).

What is measured (the "measured phase" starts after the warm-up requests):

* output tokens/s: completion tokens of the successful requests / wall time of the measured phase;
  tokens come from the server's ``usage`` when it sends one, else from counting content deltas.
* TTFT: request sent -> first non-empty delta received.
* ITL: gaps between successive non-empty deltas as the client receives them. Neither protocol
  says how many tokens a delta holds, so these are *per-delta* gaps; ``deltas_per_token`` says
  how close that is to per-token (1.0 = one delta per token). TPOT, per request
  ``(last delta - first delta) / (completion tokens - 1)``, is the per-token figure.
* errors by kind: ``http_<status>``, ``stream_error:<code>``, ``timeout``, ``connection:<Error>``,
  ``incomplete_stream`` (closed before ``done``/``[DONE]``).
* server event-loop lag from ``GET /stats/loop_lag?since=<run start>`` (chatstream only; "n/a"
  when the route is missing).

Example::

    .venv/bin/python -m benchmarks.serving --url http://127.0.0.1:8000 --clients 16 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx

from .prompts import prompt_for

PROTOCOLS = ("chatstream", "openai")
FALLBACK_MODEL_NAME = "SmolLM2-135M-Instruct"
# After a 503, a client waits Retry-After seconds, but never more than this, before its next request.
MAX_BACKOFF_S = 1.0


@dataclass
class LoadConfig:
    """What load to send. The CLI and ``benchmarks.compare`` both build one of these."""

    url: str = "http://127.0.0.1:8000"
    protocol: str = "chatstream"
    clients: int = 16
    requests: int | None = None  # measured requests in all; with no duration either: 2 per client
    duration: float | None = None  # or: keep sending for this many seconds
    max_tokens: int = 128
    warmup: int = 0
    warmup_max_tokens: int | None = None  # warm-up replies may be shorter; default: max_tokens
    seed: int = 0
    # Chat sampling by default, what chat UIs send (and chatstream's own defaults); temperature 0 = greedy.
    # Every server gets the same parameters: repetition penalty off (llama-server's default).
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    min_p: float = 0.05  # llama-server's default, sent to every server so all cut the same tail
    repetition_penalty: float = 1.0
    model_name: str | None = None  # openai: default is the first id of GET /v1/models
    clear_context: bool = True
    request_timeout: float = 300.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}")
        if self.clients < 1:
            raise ValueError("clients must be >= 1")
        if self.requests is not None and self.duration is not None:
            raise ValueError("give requests or duration, not both")
        if self.requests is None and self.duration is None:
            self.requests = 2 * self.clients
        self.url = self.url.rstrip("/")


@dataclass
class RequestRecord:
    """What one request did, as the client saw it. Times are ``time.perf_counter()`` seconds."""

    index: int
    client: int
    start: float = 0.0
    end: float = 0.0
    ok: bool = False
    error: str | None = None
    first_token: float | None = None
    last_token: float | None = None
    deltas: int = 0
    delta_gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    queued_events: int = 0
    retry_after: float | None = None
    server_timing: dict[str, Any] | None = None

    def on_delta(self, at: float) -> None:
        if self.first_token is None:
            self.first_token = at
        else:
            self.delta_gaps.append(at - self.last_token)  # type: ignore[operator]
        self.last_token = at
        self.deltas += 1


# ---------------------------------------------------------------------------------------------
# Server-Sent Events


@dataclass
class ServerSentEvent:
    event: str
    data: str


class SSEDecoder:
    """Lines of a ``text/event-stream`` in, events out (the parts of the WHATWG rules we need)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def decode(self, line: str) -> ServerSentEvent | None:
        if not line:
            event, data = self._event, self._data
            self._event, self._data = "", []
            if not data:  # an event with no data field is not dispatched
                return None
            return ServerSentEvent(event or "message", "\n".join(data))
        if line.startswith(":"):  # comment / keep-alive
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


class LineSplitter:
    """Bytes in, lines out, split on CRLF, LF or CR only.

    Done on bytes rather than with ``httpx.Response.aiter_lines`` because that uses
    ``str.splitlines``, which also splits on U+2028 and friends a server may leave unescaped.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        lines = []
        while True:
            lf, cr = self._buffer.find(b"\n"), self._buffer.find(b"\r")
            if lf < 0 and cr < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr == len(self._buffer) - 1:
                    break  # a CR at the end may be the first half of a CRLF
                end, skip = cr, 2 if self._buffer[cr + 1 : cr + 2] == b"\n" else 1
            else:
                end, skip = lf, 1
            lines.append(self._buffer[:end].decode("utf-8", errors="replace"))
            self._buffer = self._buffer[end + skip :]
        return lines

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer, b""
        return [rest.rstrip(b"\r").decode("utf-8", errors="replace")] if rest else []


async def iter_sse(response: httpx.Response) -> AsyncIterator[tuple[float, ServerSentEvent]]:
    """Events of a streaming response, each with the ``perf_counter`` time its bytes arrived."""
    splitter, decoder = LineSplitter(), SSEDecoder()
    async for chunk in response.aiter_bytes():
        at = time.perf_counter()
        for line in splitter.feed(chunk):
            event = decoder.decode(line)
            if event is not None:
                yield at, event
    at = time.perf_counter()
    for line in [*splitter.flush(), ""]:
        event = decoder.decode(line)
        if event is not None:
            yield at, event


# ---------------------------------------------------------------------------------------------
# One request per protocol


class _Failed(Exception):
    """Ends a request with an error kind."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


async def _check_status(response: httpx.Response, record: RequestRecord) -> None:
    if response.status_code != 200:
        await response.aread()
        record.retry_after = _retry_after(response)
        raise _Failed(f"http_{response.status_code}")


def _chatstream_body(cfg: LoadConfig, index: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user_input": prompt_for(index, cfg.seed),
        "regenerate": False,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
    }
    body.update(_sampling(cfg, index))
    return body


def _sampling(cfg: LoadConfig, index: int) -> dict[str, Any]:
    """The sampling fields every protocol sends alike: a fixed seed per request when sampling."""
    fields: dict[str, Any] = {"repetition_penalty": cfg.repetition_penalty}
    if cfg.temperature > 0:
        fields.update(top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p, seed=cfg.seed * 1_000_003 + index)
    return fields


def sampling_label(cfg: LoadConfig) -> str:
    if cfg.temperature <= 0:
        return "greedy (temperature 0)"
    return f"temperature {cfg.temperature:g}, top_p {cfg.top_p:g}, top_k {cfg.top_k}, min_p {cfg.min_p:g}, seed per request"


def greedy(cfg: LoadConfig) -> LoadConfig:
    """The same load, greedy: the second run every report gives."""
    return replace(cfg, temperature=0.0)


async def _chatstream_request(client: httpx.AsyncClient, cfg: LoadConfig, record: RequestRecord) -> None:
    if cfg.clear_context:
        cleared = await client.post("/clear_context")
        if cleared.status_code >= 400:
            raise _Failed(f"clear_context_http_{cleared.status_code}")
    body = _chatstream_body(cfg, record.index)
    record.start = time.perf_counter()
    headers = {"Accept": "text/event-stream"}
    async with client.stream("POST", "/chat_stream", json=body, headers=headers) as response:
        await _check_status(response, record)
        async for at, event in iter_sse(response):
            data = json.loads(event.data)
            if event.event == "delta":
                if data.get("text"):
                    record.on_delta(at)
            elif event.event == "queued":
                record.queued_events += 1
            elif event.event == "done":
                usage = data.get("usage") or {}
                if "completion_tokens" in usage:
                    record.completion_tokens = int(usage["completion_tokens"])
                    record.tokens_from_usage = True
                record.prompt_tokens = usage.get("prompt_tokens")
                record.finish_reason = data.get("finish_reason")
                record.server_timing = data.get("timing")
                if data.get("status", "success") != "success":
                    raise _Failed(f"done_status:{data.get('status')}")
                record.ok = True
            elif event.event == "error":
                raise _Failed(f"stream_error:{data.get('error', 'unknown')}")
    if not record.ok:
        raise _Failed("incomplete_stream")
    if not record.tokens_from_usage:
        record.completion_tokens = record.deltas


def _openai_body(cfg: LoadConfig, index: int, model_name: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_name,
        "messages": [{"role": "user", "content": prompt_for(index, cfg.seed)}],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(_sampling(cfg, index))
    return body


async def _openai_request(
    client: httpx.AsyncClient, cfg: LoadConfig, record: RequestRecord, model_name: str
) -> None:
    body = _openai_body(cfg, record.index, model_name)
    record.start = time.perf_counter()
    headers = {"Accept": "text/event-stream"}
    done = False
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        await _check_status(response, record)
        async for at, event in iter_sse(response):
            if event.data.strip() == "[DONE]":
                done = True
                break
            data = json.loads(event.data)
            if data.get("error"):
                error = data["error"]
                code = (error.get("code") or error.get("type")) if isinstance(error, dict) else str(error)[:60]
                raise _Failed(f"stream_error:{code or 'error'}")
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    record.on_delta(at)
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
            usage = data.get("usage")
            if usage and "completion_tokens" in usage:
                record.completion_tokens = int(usage["completion_tokens"])
                record.prompt_tokens = usage.get("prompt_tokens")
                record.tokens_from_usage = True
    if not done and record.finish_reason is None:
        raise _Failed("incomplete_stream")
    if not record.tokens_from_usage:
        record.completion_tokens = record.deltas
    record.ok = True


async def run_request(
    client: httpx.AsyncClient, cfg: LoadConfig, index: int, client_id: int, model_name: str | None
) -> RequestRecord:
    """Send request number ``index`` and read its stream to the end; never raises."""
    record = RequestRecord(index=index, client=client_id)
    try:
        async with asyncio.timeout(cfg.request_timeout):
            if cfg.protocol == "chatstream":
                await _chatstream_request(client, cfg, record)
            else:
                await _openai_request(client, cfg, record, model_name or FALLBACK_MODEL_NAME)
    except _Failed as failed:
        record.ok, record.error = False, failed.kind
    except (TimeoutError, httpx.TimeoutException):
        record.ok, record.error = False, "timeout"
    except httpx.HTTPError as exc:
        record.ok, record.error = False, f"connection:{type(exc).__name__}"
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
        record.ok, record.error = False, f"bad_stream:{type(exc).__name__}"
    record.end = time.perf_counter()
    if not record.start:
        record.start = record.end
    return record


# ---------------------------------------------------------------------------------------------
# The load


def _new_client(cfg: LoadConfig) -> httpx.AsyncClient:
    # trust_env=False: a proxy set in the environment must never sit between us and loopback.
    return httpx.AsyncClient(
        base_url=cfg.url,
        timeout=httpx.Timeout(cfg.request_timeout, connect=10.0),
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
        trust_env=False,
    )


async def resolve_model_name(cfg: LoadConfig) -> str | None:
    """The model name openai requests carry: ``--model-name``, else the first of ``/v1/models``."""
    if cfg.protocol != "openai":
        return None
    if cfg.model_name:
        return cfg.model_name
    try:
        async with _new_client(cfg) as client:
            response = await client.get("/v1/models")
            if response.status_code == 200:
                models = response.json().get("data") or []
                if models and models[0].get("id"):
                    return str(models[0]["id"])
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return FALLBACK_MODEL_NAME


async def fetch_loop_lag(cfg: LoadConfig, since_unix: float) -> dict[str, Any] | None:
    """The server's event-loop lag since ``since_unix``, or None where the route is missing."""
    try:
        async with _new_client(cfg) as client:
            response = await client.get("/stats/loop_lag", params={"since": f"{since_unix:.6f}"})
            if response.status_code != 200:
                return None
            data = response.json()
            return data if isinstance(data, dict) and "p50_ms" in data else None
    except (httpx.HTTPError, ValueError):
        return None


async def _drive(
    cfg: LoadConfig,
    clients: int,
    next_index: Callable[[], int | None],
    model_name: str | None,
    records: list[RequestRecord],
) -> None:
    async def one_client(client_id: int) -> None:
        async with _new_client(cfg) as client:
            while (index := next_index()) is not None:
                record = await run_request(client, cfg, index, client_id, model_name)
                records.append(record)
                if record.retry_after is not None:
                    await asyncio.sleep(min(record.retry_after, MAX_BACKOFF_S))

    await asyncio.gather(*(one_client(c) for c in range(clients)))


async def _report_progress(cfg: LoadConfig, records: list[RequestRecord], started: float) -> None:
    total = cfg.requests
    while True:
        await asyncio.sleep(5.0)
        tokens = sum(r.completion_tokens for r in records if r.ok)
        errors = sum(not r.ok for r in records)
        done = f"{len(records)}/{total}" if total else f"{len(records)}"
        print(
            f"  ... {done} requests done, {errors} errors, {tokens} tokens, "
            f"{time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Warm up, run the measured phase, fetch the server's loop lag; return the summary."""
    model_name = await resolve_model_name(cfg)

    if cfg.warmup > 0:
        warmup_cfg = replace(cfg, max_tokens=cfg.warmup_max_tokens or cfg.max_tokens)
        warmup_left = iter(range(-1, -cfg.warmup - 1, -1))
        warmup_records: list[RequestRecord] = []
        clients = min(cfg.clients, cfg.warmup)
        await _drive(warmup_cfg, clients, lambda: next(warmup_left, None), model_name, warmup_records)
        failed = Counter(r.error for r in warmup_records if not r.ok)
        if failed:
            print(f"  warm-up errors: {dict(failed)}", file=sys.stderr)

    records: list[RequestRecord] = []
    counter = iter(range(10**12))
    started_unix, started = time.time(), time.perf_counter()
    if cfg.duration is not None:
        deadline = started + cfg.duration
        next_index = lambda: next(counter) if time.perf_counter() < deadline else None  # noqa: E731
    else:
        limit = iter(range(cfg.requests or 0))
        next_index = lambda: next(limit, None)  # noqa: E731

    progress = asyncio.create_task(_report_progress(cfg, records, started)) if cfg.progress else None
    try:
        await _drive(cfg, cfg.clients, next_index, model_name, records)
    finally:
        if progress is not None:
            progress.cancel()
    wall = time.perf_counter() - started

    loop_lag = await fetch_loop_lag(cfg, started_unix)
    return summarize(cfg, records, wall, loop_lag, model_name)


# ---------------------------------------------------------------------------------------------
# Figures


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(values: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 2)

    mean = sum(values) / len(values) if values else None
    return {"p50": r(percentile(values, 50)), "p99": r(percentile(values, 99)), "mean": r(mean)}


def summarize(
    cfg: LoadConfig,
    records: list[RequestRecord],
    wall_s: float,
    loop_lag: dict[str, Any] | None,
    model_name: str | None = None,
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    deltas = sum(r.deltas for r in ok)
    ttft = [r.first_token - r.start for r in ok if r.first_token is not None]
    gaps = [gap for r in ok for gap in r.delta_gaps]
    tpot = [
        (r.last_token - r.first_token) / (r.completion_tokens - 1)
        for r in ok
        if r.first_token is not None and r.last_token is not None and r.completion_tokens > 1
    ]
    from_usage = sum(r.tokens_from_usage for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"} | {"sampling": sampling_label(cfg)},
        "model_name": model_name,
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(Counter(r.error for r in records if not r.ok)),
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "ttft_ms": _ms(ttft),
        "itl_ms": _ms(gaps),
        "itl_kind": "per delta",
        "tpot_ms": _ms(tpot),
        "deltas_per_token": round(deltas / tokens, 3) if tokens else None,
        "tokens_source": "usage" if from_usage == len(ok) else ("counted deltas" if from_usage == 0 else "mixed"),
        "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
        "loop_lag_ms": loop_lag,
        "requests_detail": [
            {
                "index": r.index,
                "client": r.client,
                "ok": r.ok,
                "error": r.error,
                "ttft_ms": None if r.first_token is None else round((r.first_token - r.start) * 1000, 2),
                "duration_ms": round((r.end - r.start) * 1000, 2),
                "completion_tokens": r.completion_tokens,
                "deltas": r.deltas,
                "finish_reason": r.finish_reason,
                "server_timing": r.server_timing,
            }
            for r in sorted(records, key=lambda r: r.index)
        ],
    }


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def format_summary(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    amount = f"{cfg['duration']} s" if cfg["duration"] is not None else f"{cfg['requests']} requests"
    lag = summary["loop_lag_ms"]
    lag_text = (
        "n/a"
        if lag is None
        else f"p50 {_fmt(lag.get('p50_ms'), ' ms', 2)}, p99 {_fmt(lag.get('p99_ms'), ' ms', 2)}, "
        f"max {_fmt(lag.get('max_ms'), ' ms', 2)} ({lag.get('samples')} samples)"
    )
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items())) or "none"
    ttft, itl, tpot = summary["ttft_ms"], summary["itl_ms"], summary["tpot_ms"]
    dpt = summary["deltas_per_token"]
    lines = [
        f"{cfg['protocol']} load on {cfg['url']}: {amount}, {cfg['clients']} clients, "
        f"max_tokens {cfg['max_tokens']}, {cfg.get('sampling') or 'temperature ' + str(cfg['temperature'])}"
        + (f", model {summary['model_name']}" if summary["model_name"] else ""),
        f"  requests ok / sent   {summary['ok']} / {summary['requests']}",
        f"  wall time            {summary['wall_s']:.2f} s",
        f"  output tokens        {summary['output_tokens']} (from {summary['tokens_source']})",
        f"  output tokens/s      {_fmt(summary['output_tokens_per_s'])}",
        f"  requests/s           {_fmt(summary['requests_per_s'], digits=3)}",
        f"  TTFT p50 / p99       {_fmt(ttft['p50'], ' ms')} / {_fmt(ttft['p99'], ' ms')}",
        f"  ITL p50 / p99        {_fmt(itl['p50'], ' ms')} / {_fmt(itl['p99'], ' ms')} "
        f"(per delta; {_fmt(dpt, digits=2)} deltas per token)",
        f"  TPOT p50 / p99       {_fmt(tpot['p50'], ' ms')} / {_fmt(tpot['p99'], ' ms')} (per token, per request)",
        f"  errors               {errors}",
        f"  server loop lag      {lag_text}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description="Drive a running chat server with N concurrent streaming clients and report "
        "throughput, time to first token, inter-token latency, errors and server loop lag.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="chatstream")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="measured requests in all (default: 2 per client)")
    amount.add_argument("--duration", type=float, help="or: keep sending for this many seconds")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    parser.add_argument("--warmup-max-tokens", type=int, help="max_tokens of warm-up requests (default: --max-tokens)")
    parser.add_argument("--seed", type=int, default=0, help="picks the prompts (and sampling seeds)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7, chat sampling)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--min-p", type=float, default=0.05)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-greedy-run", action="store_true",
                        help="skip the second, greedy run that follows a sampled one")
    parser.add_argument("--model-name", help="openai: model to request (default: first of GET /v1/models)")
    parser.add_argument(
        "--keep-context",
        action="store_true",
        help="chatstream: do not POST /clear_context before each request (prompts then grow)",
    )
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--output-json", help="write the summary (and per-request figures) here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        url=args.url,
        protocol=args.protocol,
        clients=args.clients,
        requests=args.requests,
        duration=args.duration,
        max_tokens=args.max_tokens,
        warmup=args.warmup,
        warmup_max_tokens=args.warmup_max_tokens,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        model_name=args.model_name,
        clear_context=not args.keep_context,
        request_timeout=args.request_timeout,
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configs = [cfg] if cfg.temperature <= 0 or args.no_greedy_run else [cfg, greedy(cfg)]
    summaries = []
    for one in configs:
        summary = asyncio.run(run_load(one))
        print(format_summary(summary))
        summaries.append(summary)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(summaries[0] if len(summaries) == 1 else {"sampled": summaries[0], "greedy": summaries[1]},
                      f, indent=2)
            f.write("\n")
    return 0 if all(s["ok"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
