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
from typing import Any, ClassVar

from pydantic import Field

from ...service.events import Done
from ...service.sampling import SamplingLimits
from .protocol import OpenAIError, Refusals, SamplingRequest, json_object, unsupported, validated

DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 5  # OpenAI's own limit for the legacy logprobs


class CompletionRequest(SamplingRequest):
    """The body of ``POST /v1/completions``: the shared sampling fields and the legacy ones.
    ``response_format`` is vLLM's extension here: JSON out of a raw prompt."""

    refused: ClassVar[Refusals] = (
        *SamplingRequest.refused,
        ("suffix", lambda v: bool(v), "a suffix (insertion)"),
    )

    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    # Accepted only with the value that asks for nothing extra.
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check(self) -> None:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise unsupported("prompt", "several prompts in one request (send one request each)")
        if prompt in ("", [], [""]):
            raise OpenAIError(400, "Invalid value for 'prompt': it is empty.", param="prompt", code="invalid_value")
        if self.best_of not in (None, self.n or 1):
            raise unsupported("best_of", "best_of other than n (generating more choices than are returned)")
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "echo with logprobs (the prompt's own log-probabilities)")
        super().check()

    def default_token_limit(self, limits: SamplingLimits) -> int:
        return DEFAULT_MAX_TOKENS  # OpenAI's default for this endpoint, not the server's

    def logprobs_count(self) -> int | None:
        return self.logprobs


def parse_completion_request(body: bytes, context_len: int, vocab_size: int | None) -> CompletionRequest:
    """Validate a request body. A token-id prompt longer than the context is refused before the schema
    walks every id (a 4 MiB one takes about 0.3 s of the GIL to validate); its ids must be in the vocabulary."""
    data = json_object(body)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) > context_len:
        raise OpenAIError(400, f"This model's maximum context length is {context_len} tokens. However, your "
                          f"prompt has {len(prompt)} tokens. Please reduce the length of the prompt.",
                          param="prompt", code="context_length_exceeded")
    request = validated(CompletionRequest, data)
    ids = request.prompt
    if ids and isinstance(ids[0], int) and not all(0 <= t < (vocab_size or 1 << 31) for t in ids):  # type: ignore[operator]
        raise OpenAIError(400, "Invalid value for 'prompt': a token id is beyond the vocabulary.",
                          param="prompt", code="invalid_value")
    return request


def prompt_text(request: CompletionRequest) -> str | list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])
    return prompt  # type: ignore[return-value]


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
