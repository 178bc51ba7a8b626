"""The legacy ``POST /v1/completions`` wire: a raw prompt in, its continuation out (no chat template).

The prompt is one string (or a list holding one string, or a list of token ids); the sampling
fields and their bounds are the chat wire's. ``max_tokens`` defaults to 16, as OpenAI's does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ...engine import SamplingParams
from ...errors import InvalidParams
from ...service.events import Done
from ...service.sampling import SamplingLimits
from ...service.sampling import to_sampling_params as sampling_params
from ...service.structured import response_format_grammar
from .protocol import _INT64_MIN, _UINT64_END, OpenAIError, StreamOptions, _unsupported, json_object, validated

DEFAULT_MAX_TOKENS = 16


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
    # Accepted only with the value that asks for nothing extra.
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)


_REFUSED = [
    ("n", lambda v: v not in (None, 1), "more than one choice (n > 1)"),
    ("best_of", lambda v: v not in (None, 1), "best_of > 1"),
    ("echo", lambda v: bool(v), "echoing the prompt"),
    ("suffix", lambda v: bool(v), "a suffix (insertion)"),
    ("logprobs", lambda v: v not in (None, 0), "log probabilities"),
]


def parse_completion_request(body: bytes) -> CompletionRequest:
    request = validated(CompletionRequest, json_object(body), _REFUSED)
    if isinstance(request.prompt, list) and not isinstance(request.prompt and request.prompt[0], int) \
            and len(request.prompt) != 1:
        raise _unsupported("prompt", "several prompts in one request (send one request each)")
    if request.prompt in ("", []):
        raise OpenAIError(400, "Invalid value for 'prompt': it is empty.", param="prompt", code="invalid_value")
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
    try:
        if request.logit_bias:
            if not all(t.isdigit() and len(t) <= 9 for t in request.logit_bias):
                raise InvalidParams("'logit_bias' keys must be token ids", param="logit_bias")
            values["logit_bias"] = tuple((int(t), b) for t, b in request.logit_bias.items())
        values["grammar"] = response_format_grammar(request.response_format)
        return sampling_params(defaults, limits, values, {"max_new_tokens": "max_tokens"})
    except InvalidParams as exc:
        raise OpenAIError(400, f"Invalid value for {exc.message}.", param=exc.param, code="invalid_value") from None


class TextCompletion:
    """Encodes one turn's events as ``text_completion`` objects (chunks, or one whole)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(done)}

    def whole(self, text: str, done: Done) -> dict[str, Any]:
        return {**self.chunk(text, done.finish_reason), "usage": usage(done)}


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}
