"""An engine that generates on other servers: any OpenAI-compatible upstream, one or several.

chatstream keeps what is its own (sessions, the queue with positions, the seed API and its
callbacks, the UI) and sends each turn's messages to ``/v1/chat/completions`` of an upstream
(vLLM, SGLang, TGI, llama.cpp's server, ``transformers serve``, another chatstream), streaming.
Multi-GPU and multi-node generation is the upstream's job.

What only an engine can enforce goes to the upstream in OpenAI's form, which vLLM, llama.cpp's
server and chatstream all take on ``/v1/chat/completions``: ``response_format`` (the JSON text a
face kept on :class:`SamplingParams` beside the grammar; a forced tool call is sent as the
``json_schema`` of the call), ``logprobs``/``top_logprobs`` (read back from each chunk's
``choices[0].logprobs.content``) and ``logit_bias`` (token ids are the model's, the same on both
sides). An upstream that answers 400 (413, 422) refused this request, not its work: the request
ends as refused (a client error naming the field where the upstream's answer does), and nothing
is ejected or retried.

With several upstreams a request goes to the healthy one with the fewest outstanding requests.
A request that fails before its reply began is retried on another upstream; a failure after
text was streamed cannot be retried (the client has seen it), so the stream ends with an error
and the Turn saves the partial reply. An upstream that cannot be reached is ejected for a
backoff period; one that gave a bad answer (a 5xx, an error event, a broken stream) is ejected
only while another upstream stays available, since one client's odd request can cause it and
must not cut every other user off. Cancelling a stream closes the upstream connection at once,
which is how an OpenAI-compatible server learns the client left and frees its slot.

An upstream is another server, not a part of this one, so what it sends is contained: a reply
ends as ``length`` at ``max_new_tokens`` deltas or ``max_new_tokens * MAX_CHARS_PER_TOKEN``
characters whatever the upstream does with ``max_tokens``; an SSE line longer than
``MAX_LINE_BYTES`` (memory stays bounded), a compressed stream, or a chunk whose fields have the
wrong types ends the request with an error and closes the upstream request. Log-probabilities are
checked the same way (a string token, a finite number, byte values); no more top entries than asked
for and no more tokens than ``max_new_tokens`` are kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from ..protocol import EngineInfo, GenerationOutput
from ..sampling_params import SamplingParams
from ..stream import RequestStream

if TYPE_CHECKING:
    from ...settings import Settings

logger = logging.getLogger("chatstream")

# Fields that are not OpenAI's but that vLLM, SGLang and llama.cpp's server accept.
_EXTENSIONS = ("top_k", "repetition_penalty")
# OpenAI fields sent only when a request asks for them: what an upstream's 400 may be about.
_FORWARDED = ("response_format", "logit_bias", "top_logprobs", "logprobs")
# One SSE line of an upstream's stream: a chunk carrying one delta is well under 1 KiB.
MAX_LINE_BYTES = 256 * 1024
# A reply is cut at max_new_tokens times this many characters: no tokenizer's tokens are
# longer on average, so only an upstream ignoring max_tokens (or lying) reaches it.
MAX_CHARS_PER_TOKEN = 64
_NEWLINE = re.compile(rb"\r\n|\r|\n")


@dataclass
class Upstream:
    """One upstream server and what the router knows about it."""

    url: str
    healthy: bool = False
    outstanding: int = 0
    failures: int = 0  # requests that failed on it, in all
    model: str | None = None  # the first id of its /v1/models
    tokenize: str | None = None  # "vllm", "llama.cpp" or "none" once probed: how to count tokens there
    extensions: bool = True  # whether it takes top_k and repetition_penalty
    last_error: str | None = None
    _consecutive: int = 0
    _ejected_until: float = 0.0
    _picked: int = 0

    def available(self, now: float) -> bool:
        return self.healthy and now >= self._ejected_until

    def state(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "outstanding": self.outstanding,
                "failures": self.failures, "model": self.model, "last_error": self.last_error}


class _Retryable(Exception):
    """The request failed on this upstream: another upstream may take it if nothing was streamed yet.

    ``down``: the upstream itself is unreachable (eject it), rather than this answer being bad.
    """

    def __init__(self, message: str, *, down: bool = False) -> None:
        super().__init__(message)
        self.down = down


class _Refused(Exception):
    """The upstream answered with a client error: retrying elsewhere would not help.

    ``by_request``: the request itself was refused (400, 422: a field, the length), not the front's
    access (401, 403, 404: the front's configuration); ``param`` names the field where known.
    """

    def __init__(self, message: str, *, by_request: bool = False, param: str | None = None) -> None:
        super().__init__(message)
        self.by_request = by_request
        self.param = param


@dataclass
class _Progress:
    deltas: int = 0
    chars: int = 0
    logprobs: int = 0  # token entries passed on
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    cut: bool = False  # ended by our own length limit, not by the upstream


class RemoteEngine:
    """The Engine protocol over OpenAI-compatible upstream servers.

    ``urls`` are the upstreams' base URLs (``http://host:8001``; a trailing ``/v1`` is accepted).
    ``model`` is the model name sent to them (default: each upstream's first ``/v1/models`` id).
    ``api_key`` is sent as ``Authorization: Bearer``. Health is checked every
    ``health_interval_s`` (``GET /health``, or ``/v1/models`` where there is none).
    """

    forwards = True  # response_format, logit_bias and logprobs go to the upstream, which enforces them

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        health_interval_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float | None = 300.0,
        backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if not urls:
            raise ValueError("a remote engine needs at least one upstream URL")
        self._upstreams = [Upstream(_base_url(url)) for url in urls]
        self.model = model
        self.api_key = api_key
        self.health_interval_s = health_interval_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=None)
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._picks = 0
        self._starting: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteEngine:
        return cls(settings.engine_url, model=settings.engine_model, api_key=settings.engine_api_key,
                   health_interval_s=settings.engine_health_interval_s, read_timeout_s=settings.stall_timeout_s)

    # -- state --
    @property
    def ready(self) -> bool:
        """True when at least one upstream is healthy."""
        return any(u.healthy for u in self._upstreams)

    @property
    def upstreams(self) -> list[Upstream]:
        """Each upstream's live state (``url``, ``healthy``, ``outstanding``, ``failures``), for health and metrics."""
        return list(self._upstreams)

    @property
    def served_model(self) -> str | None:
        """The model name to show: the configured one, else the first upstream's."""
        return self.model or next((u.model for u in self._upstreams if u.model), None)

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(model_name=self.served_model, upstreams=self.upstreams)

    def tokenize_upstream(self) -> Upstream | None:
        """A healthy upstream to count tokens on (for :class:`RemoteTokenizer`)."""
        return next((u for u in self._upstreams if u.healthy), None)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # -- lifecycle --
    async def start(self) -> None:
        """Check every upstream once (so ``ready`` means something), then keep checking.

        Idempotent; a call made while the first check runs waits for it.
        """
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self._timeout, headers=self.headers,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        await self._probe_all()
        for u in self._upstreams:
            logger.info("upstream %s: %s, model %s, token counting: %s", u.url,
                        "healthy" if u.healthy else f"not healthy ({u.last_error})", u.model or "-",
                        _TOKENIZE_LABELS.get(u.tokenize or "", "unknown yet"))
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=5)
        if self._health_task is not None:
            self._health_task.cancel()
        if self._client is not None:
            await self._client.aclose()
        self._starting = None

    # -- requests --
    def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
    ) -> RequestStream:
        """Stream one reply from an upstream. ``messages`` is what is sent; the ids only give the count."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(loop, self._cancel, request_id)
        prompt_tokens = len(prompt_token_ids)
        if messages is None:
            stream.put_nowait(_final("error", prompt_tokens, 0, "a remote engine needs the messages, not only token ids"))
            return stream
        task = loop.create_task(self._run(stream, [dict(m) for m in messages], params, prompt_tokens))
        self._tasks[stream.request_id] = task

        def done(_task: asyncio.Task[None]) -> None:
            self._tasks.pop(stream.request_id, None)
            # Cancelled before its first step, the task never ran its body: end the stream here.
            stream.put_nowait(_final("cancelled", prompt_tokens, 0))

        task.add_done_callback(done)
        return stream

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()  # leaving `client.stream(...)` closes the upstream connection

    async def _run(self, stream: RequestStream, messages: list[dict[str, str]], params: SamplingParams,
                   prompt_tokens: int) -> None:
        await self.start()
        progress = _Progress()
        tried: set[int] = set()
        last_error = "no upstream is healthy"
        try:
            while True:
                upstream = self._pick(tried)
                if upstream is None:
                    stream.put_nowait(_final("error", prompt_tokens, 0, f"no upstream engine could take the request: {last_error}"))
                    return
                tried.add(id(upstream))
                try:
                    await self._stream_from(upstream, stream, messages, params, progress)
                except _Retryable as exc:
                    last_error = f"{upstream.url}: {exc}"
                    self._eject(upstream, str(exc), down=exc.down)
                    if progress.deltas:  # the client has seen text: a retry would repeat it
                        stream.put_nowait(_final("error", prompt_tokens, progress.deltas,
                                                 f"the upstream engine failed mid-reply ({last_error})"))
                        return
                    logger.warning("upstream %s failed before replying (%s); retrying elsewhere", upstream.url, exc)
                    continue
                except _Refused as exc:
                    stream.put_nowait(_final("error", prompt_tokens, 0, str(exc), refused=exc.by_request,
                                             param=exc.param))
                    return
                upstream._consecutive = 0
                usage = progress.usage
                reason = "length" if progress.finish_reason == "length" else "stop"
                if progress.cut:
                    completion_tokens = params.max_new_tokens
                else:  # what the upstream counted, never more than it was allowed
                    completion_tokens = min(usage.get("completion_tokens") or progress.deltas, params.max_new_tokens)
                stream.put_nowait(_final(reason, usage.get("prompt_tokens") or prompt_tokens, completion_tokens))
                return
        except asyncio.CancelledError:
            stream.put_nowait(_final("cancelled", prompt_tokens, progress.deltas))

    async def _stream_from(self, upstream: Upstream, stream: RequestStream, messages: list[dict[str, str]],
                           params: SamplingParams, progress: _Progress) -> None:
        assert self._client is not None
        upstream.outstanding += 1
        try:
            while True:
                body = self._request_body(upstream, messages, params)
                try:
                    # identity: a compressed stream could expand without bound before a line is split
                    async with self._client.stream("POST", upstream.url + "/v1/chat/completions", json=body,
                                                   headers={"Accept-Encoding": "identity"}) as response:
                        if response.status_code >= 500:
                            raise _Retryable(f"HTTP {response.status_code}: {(await _error_of(response))[0]}")
                        if response.status_code >= 400:
                            text, param = await _error_of(response)
                            if upstream.extensions and _rejects_extensions(response.status_code, text, body):
                                upstream.extensions = False  # e.g. transformers serve: 422 on unknown fields
                                logger.info("upstream %s does not take %s: sending OpenAI fields only",
                                            upstream.url, ", ".join(_EXTENSIONS))
                                continue
                            raise _refusal(response.status_code, text, param, body)
                        await self._read_events(response, stream, params, progress)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nobody answers there
                    raise _Retryable(_describe(exc), down=True) from None
                except httpx.HTTPError as exc:  # reset, read timeout, broken chunking: this request's fate
                    raise _Retryable(_describe(exc)) from None
                if progress.finish_reason is None:
                    raise _Retryable("the stream ended before the reply did")
                return
        finally:
            upstream.outstanding -= 1

    async def _read_events(self, response: httpx.Response, stream: RequestStream, params: SamplingParams,
                           progress: _Progress) -> None:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _Retryable(f"the stream is compressed ({encoding[:50]}) though identity was asked for")
        max_chars = params.max_new_tokens * MAX_CHARS_PER_TOKEN
        async for line in _bounded_lines(response.aiter_raw(), MAX_LINE_BYTES):
            if not line.startswith("data:"):
                continue  # blank lines, comments (chatstream's ": queued" lines), event names
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise _Retryable(f"not JSON in the stream: {data[:200]!r}") from None
            text, finish_reason, usage, logprobs = _read_chunk(chunk, params.logprobs)
            if usage is not None:
                progress.usage = usage
            if logprobs:
                logprobs = logprobs[:max(params.max_new_tokens - progress.logprobs, 0)]
                progress.logprobs += len(logprobs)
                if not text:  # the Turn keeps them until text comes
                    stream.put_nowait(GenerationOutput(text="", logprobs=logprobs))
            if text:
                if progress.deltas >= params.max_new_tokens or progress.chars + len(text) > max_chars:
                    # Past what was asked for: end the reply here, as the model would at max_tokens.
                    room = max_chars - progress.chars
                    if progress.deltas < params.max_new_tokens and room > 0:
                        stream.put_nowait(GenerationOutput(text=text[:room], logprobs=logprobs))
                    logger.warning("upstream %s went past max_tokens=%d: the reply was cut after %d deltas",
                                   response.url, params.max_new_tokens, progress.deltas)
                    progress.finish_reason, progress.cut = "length", True
                    return  # leaving the response closes the upstream request
                progress.deltas += 1
                progress.chars += len(text)
                stream.put_nowait(GenerationOutput(text=text, logprobs=logprobs))
            if finish_reason:
                progress.finish_reason = finish_reason

    def _request_body(self, upstream: Upstream, messages: list[dict[str, str]], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        }
        model = self.model or upstream.model
        if model:
            body["model"] = model
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.response_format is not None:
            body["response_format"] = json.loads(params.response_format)
        if params.logprobs is not None:  # at least 1: llama.cpp's server sends none for top_logprobs 0
            body["logprobs"], body["top_logprobs"] = True, max(params.logprobs, 1)
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        if upstream.extensions:  # sent only when they change something
            if params.top_k:
                body["top_k"] = params.top_k
            if params.repetition_penalty != 1.0:
                body["repetition_penalty"] = params.repetition_penalty
        return body

    # -- routing and health --
    def _pick(self, tried: set[int]) -> Upstream | None:
        """The least loaded available upstream not tried yet (ties: the least recently picked)."""
        now = time.monotonic()
        fresh = [u for u in self._upstreams if id(u) not in tried]
        candidates = [u for u in fresh if u.available(now)] or [u for u in fresh if now >= u._ejected_until]
        if not candidates:
            return None
        upstream = min(candidates, key=lambda u: (u.outstanding, u._picked))
        self._picks += 1
        upstream._picked = self._picks
        return upstream

    def _eject(self, upstream: Upstream, reason: str, *, down: bool = False) -> None:
        """Take ``upstream`` out of rotation for a backoff period, unless only a bad answer (not
        ``down``) was seen and no other upstream is available: then it stays, so that one
        client's request cannot cut every other user off."""
        upstream.failures += 1
        upstream.last_error = reason
        now = time.monotonic()
        if not down and not any(u is not upstream and u.available(now) for u in self._upstreams):
            logger.warning("upstream %s failed a request (%s); kept in rotation, no other upstream is available",
                           upstream.url, reason)
            return
        upstream._consecutive += 1
        upstream.healthy = False
        backoff = min(self.backoff_s * 2 ** (upstream._consecutive - 1), self.max_backoff_s)
        upstream._ejected_until = time.monotonic() + backoff
        logger.warning("upstream %s ejected for %.0f s: %s", upstream.url, backoff, reason)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self._probe_all()
            except Exception:  # a probe must never end the loop
                logger.exception("checking the upstreams failed")

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(u) for u in self._upstreams))

    async def _probe(self, upstream: Upstream) -> None:
        assert self._client is not None
        timeout = httpx.Timeout(5.0)
        try:
            response = await self._client.get(upstream.url + "/health", timeout=timeout)
            healthy = response.status_code == 200
            if response.status_code == 404:  # no /health (e.g. OpenAI itself): a model list will do
                healthy = (await self._client.get(upstream.url + "/v1/models", timeout=timeout)).status_code == 200
            if healthy and upstream.model is None:
                upstream.model = await self._first_model(upstream, timeout)
            if healthy and upstream.tokenize is None:
                try:
                    upstream.tokenize = await self._tokenize_style(upstream, timeout)
                except httpx.HTTPError:  # counting falls back to the estimate; generation is unaffected
                    upstream.tokenize = "none"
            error = None if healthy else f"health check: HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            healthy, error = False, f"health check: {_describe(exc)}"
        if healthy != upstream.healthy:
            logger.log(logging.INFO if healthy else logging.WARNING, "upstream %s is %s", upstream.url,
                       "healthy" if healthy else f"not healthy ({error})")
        upstream.healthy = healthy
        if error:
            upstream.last_error = error

    async def _first_model(self, upstream: Upstream, timeout: httpx.Timeout) -> str | None:
        assert self._client is not None
        response = await self._client.get(upstream.url + "/v1/models", timeout=timeout)
        try:
            data = response.json().get("data") or []
            return str(data[0]["id"]) if data else None
        except (ValueError, AttributeError, KeyError, TypeError):
            return None

    async def _tokenize_style(self, upstream: Upstream, timeout: httpx.Timeout) -> str:
        """Which ``/tokenize`` the upstream speaks: vLLM's (also chatstream's), llama.cpp's, or none."""
        assert self._client is not None
        model = self.model or upstream.model
        for style in ("vllm", "llama.cpp"):
            body = tokenize_body(style, "hello", model)
            response = await self._client.post(upstream.url + "/tokenize", json=body, timeout=timeout)
            if response.status_code in (404, 405):
                return "none"
            if response.status_code == 200 and tokens_of(response):  # "hello" is never zero tokens
                return style
        return "none"


_TOKENIZE_LABELS = {"vllm": "the upstream's /tokenize", "llama.cpp": "the upstream's /tokenize (llama.cpp)",
                    "none": "an estimate (the upstream has no /tokenize)"}


def tokenize_body(style: str, text: str, model: str | None) -> dict[str, Any]:
    """The body of a ``POST /tokenize`` in the upstream's dialect."""
    if style == "llama.cpp":
        return {"content": text, "add_special": False}
    body: dict[str, Any] = {"prompt": text, "add_special_tokens": False}
    if model:
        body["model"] = model
    return body


def tokens_of(response: httpx.Response) -> list[int] | None:
    try:
        tokens = response.json().get("tokens")
    except (ValueError, AttributeError):
        return None
    return tokens if isinstance(tokens, list) else None


async def _bounded_lines(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[str]:
    """The lines of a byte stream (``\\r\\n``, ``\\n`` or ``\\r`` ended); a longer line than ``limit`` bytes is an error.

    httpx's ``aiter_lines`` keeps a line in memory however long it grows: one 200 MB line cost
    264 MB. Here at most ``limit`` bytes plus one network read are held.
    """
    line = bytearray()
    async for chunk in chunks:
        start = 0
        for match in _NEWLINE.finditer(chunk):
            line += chunk[start:match.start()]
            if len(line) > limit:
                break
            yield line.decode("utf-8", errors="replace")
            line.clear()
            start = match.end()
        else:
            line += chunk[start:]
        if len(line) > limit:
            raise _Retryable(f"a line of the stream is longer than {limit} bytes")
    if line:
        yield line.decode("utf-8", errors="replace")


def _read_chunk(chunk: Any, top: int | None = None,
                ) -> tuple[str, str | None, dict[str, int] | None, tuple[dict[str, Any], ...]]:
    """The text, finish reason, usage and log-probabilities of one streamed chunk, checked field by
    field (``top``: how many top entries were asked for; None: no log-probabilities).

    Anything but OpenAI's types is refused: a number as ``delta.content`` used to end the turn
    with neither ``done`` nor ``error``.
    """
    if not isinstance(chunk, dict):
        raise _Retryable(f"a chunk of the stream is not an object: {str(chunk)[:200]!r}")
    if chunk.get("error") is not None:  # an error event in the stream (vLLM, chatstream)
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise _Retryable(f"error in the stream: {str(message)[:500]}")
    choices = _typed(chunk, "choices", list) or []
    text, finish_reason = "", None
    logprobs: tuple[dict[str, Any], ...] = ()
    for choice in choices:
        if not isinstance(choice, dict):
            raise _Retryable("a choice of the stream is not an object")
        delta = _typed(choice, "delta", dict) or {}
        content = _typed(delta, "content", str, where="delta.content")
        reason = _typed(choice, "finish_reason", str)
        entries = _typed(_typed(choice, "logprobs", dict) or {}, "content", list, where="logprobs.content")
        if _typed(choice, "index", int) not in (None, 0):
            continue  # only one choice is asked for
        text += content or ""
        finish_reason = reason or finish_reason
        if top is not None and entries:
            logprobs += tuple(_token_logprob(entry, top) for entry in entries)
    usage = _typed(chunk, "usage", dict)
    if usage is None:
        return text, finish_reason, None, logprobs
    counts = {}
    for name in ("prompt_tokens", "completion_tokens"):
        value = _typed(usage, name, int, where=f"usage.{name}")
        if value is not None:
            if value < 0:
                raise _Retryable(f"usage.{name} is negative in the stream")
            counts[name] = value
    return text, finish_reason, counts, logprobs


def _token_logprob(entry: Any, top: int | None) -> dict[str, Any]:
    """One token's entry of ``logprobs.content`` in OpenAI's shape, checked; ``top``: how many of its
    ``top_logprobs`` to keep (None: this is a top entry, which has none). Other fields (llama.cpp's
    ``id``) are dropped."""
    where = "logprobs.content" if top is not None else "logprobs.content[].top_logprobs"
    if not isinstance(entry, dict):
        raise _Retryable(f"an entry of {where} in the stream is not an object")
    token = _typed(entry, "token", str, where=f"{where}[].token")
    logprob = entry.get("logprob")
    if token is None or isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or not math.isfinite(logprob):
        raise _Retryable(f"an entry of {where} in the stream lacks a string token or a finite logprob")
    raw = _typed(entry, "bytes", list, where=f"{where}[].bytes")
    if raw is not None and not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw):
        raise _Retryable(f"{where}[].bytes in the stream holds something other than byte values")
    out: dict[str, Any] = {"token": token, "logprob": float(logprob), "bytes": raw}
    if top is not None:
        tops = _typed(entry, "top_logprobs", list, where=f"{where}[].top_logprobs") or []
        out["top_logprobs"] = [_token_logprob(t, None) for t in tops[:top]]
    return out


def _typed(data: dict[str, Any], key: str, kind: type, *, where: str | None = None) -> Any:
    """``data[key]`` if it is a ``kind`` or missing/null (None); anything else is a bad answer."""
    value = data.get(key)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise _Retryable(f"{where or key} in the stream is a {type(value).__name__}, not a {kind.__name__}")


def _base_url(url: str) -> str:
    return url.strip().rstrip("/").removesuffix("/v1")


def _rejects_extensions(status: int, text: str, body: dict[str, Any]) -> bool:
    return status in (400, 422) and any(name in body and name in text for name in _EXTENSIONS)


def _refusal(status: int, text: str, param: str | None, body: dict[str, Any]) -> _Refused:
    """What the client is told of an upstream's 4xx: a 400 or 422 is about this request, naming the
    field the upstream named, else a forwarded field its message mentions."""
    if status not in (400, 413, 422):  # 401, 403, 404: the front's credentials or model name
        return _Refused(f"the upstream engine refused the request: HTTP {status}: {text}")
    sent = [name for name in _FORWARDED if name in body]
    if param is None or param.split(".")[0].split("[")[0] not in body:
        param = next((name for name in sent if name in text), None)
    if param is not None:
        return _Refused(f"'{param}' was refused by the upstream engine (HTTP {status}): {text}",
                        by_request=True, param=param)
    carried = f" (it carried {', '.join(sent)})" if sent else ""
    return _Refused(f"the upstream engine refused the request{carried} (HTTP {status}): {text}", by_request=True)


async def _error_of(response: httpx.Response) -> tuple[str, str | None]:
    """The upstream's error message, bounded (it is logged and shown to the client), and the
    parameter it names (OpenAI's ``error.param``), if any."""
    raw = b""
    async for chunk in response.aiter_bytes():
        raw += chunk
        if len(raw) > 4096:
            break
    text = raw[:4096].decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500], None
    if not isinstance(data, dict):
        return text[:500], None
    # OpenAI, chatstream, llama.cpp: {"error": {"message", "param"}}; vLLM: {"message", "param"} at the top
    error: Any = data.get("error", data.get("detail", data.get("message")))
    param: Any = data.get("param")
    if isinstance(error, dict):
        error, param = error.get("message"), error.get("param", param)
    named = param[:100] if isinstance(param, str) and param else None
    return str(error if error is not None else text)[:500], named


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _final(reason: str, prompt_tokens: int, completion_tokens: int, error: str | None = None, *,
           refused: bool = False, param: str | None = None) -> GenerationOutput:
    return GenerationOutput(text="", finished=True, finish_reason=reason,  # type: ignore[arg-type]
                            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, error=error,
                            refused=refused, error_param=param)
