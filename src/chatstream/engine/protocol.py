"""The one interface between the web layers and whatever generates text.

An engine takes prompt token ids plus :class:`SamplingParams` and returns a stream of
:class:`GenerationOutput` events: text deltas, then one final event carrying the finish reason
and token counts. Nothing here assumes one sequence at a time: many streams run at once and
an engine is free to batch them.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from .sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class GenerationOutput:
    """One event of a generation stream.

    ``text`` is only the new text since the previous event (never cumulative).
    The last event has ``finished=True`` and a ``finish_reason``; ``error`` is set when
    ``finish_reason == "error"``.
    """

    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # With an error: True when it is this request's fault (an upstream refused one of its fields, HTTP
    # 400), not the engine's; ``error_param`` then names the field where it is known.
    refused: bool = False
    error_param: str | None = None
    # With SamplingParams.logprobs: one entry per token sampled since the previous event, in OpenAI's
    # shape ({"token", "logprob", "bytes", "top_logprobs": [...]}).
    logprobs: tuple[dict[str, Any], ...] = ()


@runtime_checkable
class GenerationStream(Protocol):
    """An async iterator of :class:`GenerationOutput` for one request.

    ``cancel()`` (or ``aclose()``) removes the request from the engine before its next step;
    the stream then ends with ``finish_reason == "cancelled"``.
    """

    request_id: str

    def __aiter__(self) -> AsyncIterator[GenerationOutput]: ...

    async def __anext__(self) -> GenerationOutput: ...

    def cancel(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class EngineInfo:
    """What the service, ``/health`` and ``/metrics`` show about an engine; None where it does not apply."""

    model_name: str | None = None  # a remote engine's served model (local engines: the service's name)
    max_model_len: int | None = None  # longest prompt + reply the engine admits
    num_blocks: int | None = None  # KV-cache blocks, and their size in tokens
    block_size: int | None = None
    error: str | None = None  # why the engine stopped working, if it crashed
    upstreams: list[Any] | None = None  # a remote engine's upstreams (url, healthy, outstanding, state())
    backend: dict[str, Any] | None = None  # the code path a local engine runs (.backend.Backend)
    kv_bytes_per_token: int | None = None  # a local engine's KV-cache bytes per token (its dtype's width)


@runtime_checkable
class Engine(Protocol):
    """What the web layers need from a text generator.

    An engine may also have an ``info`` property returning :class:`EngineInfo`; read it through
    :func:`engine_info`, which gives an empty one for engines written before it was added.
    """

    @property
    def ready(self) -> bool:
        """True once the model is loaded and requests can be served."""
        ...

    async def start(self) -> None:
        """Start worker threads. Idempotent; ``generate`` starts the engine if needed."""
        ...

    async def shutdown(self) -> None:
        """Stop workers and cancel every running request."""
        ...

    def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
    ) -> GenerationStream:
        """Submit one request. Must be called on the event loop; never blocks it.

        ``messages`` are the ``{"role", "content"}`` turns the prompt was rendered from (system
        message and the turns kept in the context). Local engines generate from the token ids and
        ignore them; a remote engine sends them to its upstream, which renders its own prompt.
        """
        ...


def engine_info(engine: Any) -> EngineInfo:
    """``engine.info``, or an empty :class:`EngineInfo` for an engine without one (or no engine)."""
    info = getattr(engine, "info", None)
    return info if isinstance(info, EngineInfo) else EngineInfo()


def accepts_messages(engine: Any) -> bool:
    """True if ``engine.generate`` takes ``messages=``; engines written before it was added do not."""
    engine_type = type(engine)
    known = _ACCEPTS_MESSAGES.get(engine_type)
    if known is None:
        try:
            parameters = inspect.signature(engine_type.generate).parameters
            known = "messages" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        except (AttributeError, TypeError, ValueError):
            known = False
        _ACCEPTS_MESSAGES[engine_type] = known
    return known


_ACCEPTS_MESSAGES: dict[type, bool] = {}
