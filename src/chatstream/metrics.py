"""Prometheus metrics of one :class:`ChatService`, in its own registry (``GET /metrics``).

Turn-level figures are recorded by the turn as it runs; gauges (queue, running, KV cache, engine
steps, upstream health) are read from the service at scrape time, so they are never stale. Each
server process exports its own figures: scrape every process (they are labelled by instance by
Prometheus), as is usual for Python servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engine.protocol import engine_info

if TYPE_CHECKING:
    from .service import ChatService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Routes are labelled by these names only, so a scanner's random paths never add series.
_ROUTES = ("/chat_stream", "/clear_context", "/history", "/health", "/health/live", "/stats/loop_lag",
           "/v1/chat/completions", "/v1/models", "/metrics", "/login", "/logout", "/", "/tokenize")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, service: ChatService) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("chatstream_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)
        self.turns = Counter("chatstream_turns", "Accepted chat turns by face and how they ended",
                             ["face", "outcome"], registry=r)
        self.refused = Counter("chatstream_turns_refused", "Chat turns refused before streaming, by reason "
                               "(session_busy = 409, too_many_requests = 503, ...)", ["face", "reason"], registry=r)
        self.queue_wait = Histogram("chatstream_queue_wait_seconds", "Time from acceptance to a generation slot",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("chatstream_time_to_first_token_seconds", "Time from the slot to the first text",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("chatstream_time_per_output_token_seconds", "Mean time per output token of a reply",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("chatstream_prompt_tokens", "Prompt tokens of finished turns", registry=r)
        self.generation_tokens = Counter("chatstream_generation_tokens", "Tokens generated in finished turns",
                                         registry=r)
        r.register(_ServiceCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceCollector(Collector):
    """Gauges read from the service when Prometheus scrapes."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        service = self.service
        yield _gauge("chatstream_queue_length", "Requests waiting for a generation slot", service.admission.waiting)
        yield _gauge("chatstream_running_turns", "Turns holding a generation slot", service.admission.running)
        yield _gauge("chatstream_concurrency", "Generation slots", service.admission.concurrency)
        yield _gauge("chatstream_ready", "1 when turns can be served", int(service.ready))
        yield _gauge("chatstream_live", "0 when the engine is stuck or crashed", int(service.live))
        engine = service.engine
        for name, attr, help_text in (
            ("chatstream_engine_running_sequences", "num_running", "Sequences in the engine's running batch"),
            ("chatstream_engine_waiting_sequences", "num_waiting", "Sequences waiting inside the engine"),
            ("chatstream_kv_cache_blocks_total", "num_blocks", "KV-cache blocks in all"),
            ("chatstream_kv_cache_blocks_free", "num_free_blocks", "KV-cache blocks free (or holding only cached prefixes)"),
            ("chatstream_kv_cache_blocks_cached", "num_cached_blocks", "KV-cache blocks holding a cached prefix"),
        ):
            value = getattr(engine, attr, None)
            if isinstance(value, int):
                yield _gauge(name, help_text, value)
        for name, attr, help_text in (
            ("chatstream_engine_steps", "num_steps", "Engine steps run"),
            ("chatstream_engine_step_seconds", "step_seconds", "Time spent in engine steps"),
            ("chatstream_engine_preemptions", "num_preemptions", "Sequences preempted to make room"),
            ("chatstream_prefix_cache_queried_tokens", "prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache"),
            ("chatstream_prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache"),
        ):
            value = getattr(engine, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                counter = CounterMetricFamily(name, help_text)
                counter.add_metric([], value)
                yield counter
        info = engine_info(engine)
        if info.backend is not None:
            backend = InfoMetricFamily("chatstream_engine_backend", "The code path the engine runs, chosen at start-up")
            backend.add_metric([], {key: str(value) for key, value in info.backend.items()})
            yield backend
        upstreams = info.upstreams
        if isinstance(upstreams, list):
            healthy = GaugeMetricFamily("chatstream_upstream_healthy", "1 when the upstream engine is in rotation",
                                        labels=["upstream"])
            outstanding = GaugeMetricFamily("chatstream_upstream_outstanding", "Requests in flight to the upstream",
                                            labels=["upstream"])
            for upstream in upstreams:
                url = str(getattr(upstream, "url", "?"))
                healthy.add_metric([url], int(bool(getattr(upstream, "healthy", False))))
                outstanding.add_metric([url], int(getattr(upstream, "outstanding", 0)))
            yield healthy
            yield outstanding


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, help_text)
    gauge.add_metric([], value)
    return gauge


def route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path == "/conversations":
        return path
    if path.startswith("/conversations/"):
        return "/conversations/{id}"  # one label, however many ids
    if path.startswith("/static/"):
        return "/static"
    return "other"


class MetricsMiddleware:
    """Counts every HTTP request by route and response status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            # "none": no response was started (the client left mid-body, or the app failed).
            self.metrics.http_requests.labels(route_label(path), str(status) if status else "none").inc()
