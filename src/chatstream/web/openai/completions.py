"""The legacy ``POST /v1/completions`` wire: a raw prompt in, its continuation out (no chat template).

The prompt is one string (or a list holding one string, or a list of token ids); the sampling
fields and their bounds are the chat wire's. ``max_tokens`` defaults to 16, as OpenAI's does.
``n`` choices (up to the chat wire's limit, each a generation of its own), ``logprobs`` in the
legacy form (``tokens``, ``token_logprobs``, ``top_logprobs`` as ``{token: logprob}``,
``text_offset``; at most 5, as OpenAI's) and ``echo`` (the prompt before the completion; not with
``logprobs``, which would need the prompt's own log-probabilities) are honoured.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ...engine import SamplingParams
from ...errors import InvalidParams
from ...service.events import Done
from ...service.sampling import SamplingLimits
from ...service.sampling import to_sampling_params as sampling_params
from ...service.structured import response_format_values
from .protocol import (
    _INT64_MIN,
    _UINT64_END,
    MAX_CHOICES,
    OpenAIError,
    StreamOptions,
    _unsupported,
    json_object,
    validated,
)

DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 5  # OpenAI's own limit for the legacy logprobs


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``; JSON types are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | list[str] | list[int]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_INT64_MIN, lt=_UINT64_END)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None  # vLLM's extension: JSON out of a raw prompt
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # Accepted only with the value that asks for nothing extra.
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


_REFUSED = [
    ("suffix", lambda v: bool(v), "a suffix (insertion)"),
]


def parse_completion_request(body: bytes) -> CompletionRequest:
    request = validated(CompletionRequest, json_object(body), _REFUSED)
    if isinstance(request.prompt, list) and not isinstance(request.prompt and request.prompt[0], int) \
            and len(request.prompt) != 1:
        raise _unsupported("prompt", "several prompts in one request (send one request each)")
    if request.prompt in ("", []):
        raise OpenAIError(400, "Invalid value for 'prompt': it is empty.", param="prompt", code="invalid_value")
    if request.best_of not in (None, request.n or 1):
        raise _unsupported("best_of", "best_of other than n (generating more choices than are returned)")
    if request.echo and request.logprobs is not None:
        raise _unsupported("echo", "echo with logprobs (the prompt's own log-probabilities)")
    if request.stream_options is not None and not request.stream:
        raise OpenAIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options", code="invalid_value")
    return request


def prompt_text(request: CompletionRequest) -> str | list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])
    return prompt  # type: ignore[return-value]


def completion_sampling_params(request: CompletionRequest, defaults: SamplingParams,
                               limits: SamplingLimits) -> SamplingParams:
    values: dict[str, Any] = {k: getattr(request, k) for k in
                              ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "min_p",
                               "presence_penalty", "frequency_penalty")
                              if getattr(request, k) is not None}
    values["max_new_tokens"] = request.max_tokens or DEFAULT_MAX_TOKENS
    if request.logprobs is not None:
        values["logprobs"] = request.logprobs
    try:
        if request.logit_bias:
            if not all(t.isdigit() and len(t) <= 9 for t in request.logit_bias):
                raise InvalidParams("'logit_bias' keys must be token ids", param="logit_bias")
            values["logit_bias"] = tuple((int(t), b) for t, b in request.logit_bias.items())
        values.update(response_format_values(request.response_format))
        return sampling_params(defaults, limits, values, {"max_new_tokens": "max_tokens"})
    except InvalidParams as exc:
        raise OpenAIError(400, f"Invalid value for {exc.message}.", param=exc.param, code="invalid_value") from None


class TextCompletion:
    """Encodes one choice's events as ``text_completion`` objects (chunks, or one whole).

    ``echo``: the prompt's text, sent before the completion. ``logprobs`` entries (the engine's,
    OpenAI's chat shape) become the legacy form, ``text_offset`` counting from the echoed prompt.
    """

    def __init__(self, model: str, include_usage: bool, *, index: int = 0, echo: str = "",
                 logprobs: bool = False) -> None:
        self.model = model
        self.logprobs = logprobs  # asked for: every choice carries a logprobs object (else null)
        self.include_usage = include_usage
        self.index = index
        self.echo = echo
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offset = len(echo)

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None = None,
              logprobs: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {**self.head(), "choices": [
            {"index": self.index, "text": text, "logprobs": self.legacy_logprobs(logprobs),
             "finish_reason": finish_reason}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def legacy_logprobs(self, entries: Sequence[dict[str, Any]] | None) -> dict[str, Any] | None:
        """Entries as ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (offsets run on
        from the previous call's)."""
        if not self.logprobs:
            return None
        entries = entries or ()
        offsets = []
        for entry in entries:
            offsets.append(self._offset)
            self._offset += len(entry["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
                "text_offset": offsets}

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return {**self.head(), "choices": [], "usage": completion_usage(done)}

    def whole(self, text: str, done: Done, logprobs: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {**self.chunk(self.echo + text, done.finish_reason, logprobs), "usage": completion_usage(done)}


def completion_usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}
