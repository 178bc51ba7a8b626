"""OpenAI's Responses API, text in and text out: ``POST /v1/responses`` (whole or streamed as its
typed events) and ``GET``/``DELETE /v1/responses/{id}``.

``instructions`` is a system message for this response only (not carried to the next, as OpenAI
does). With ``store`` (the default, as OpenAI's), the conversation so far (input and output, not
the instructions) is kept in chatstream's session store under its own key
(``openai-response:<id>``, for ``--session-ttl-s``), so ``previous_response_id`` continues it:
server-side state is what chatstream already keeps. Tools, images, files, reasoning and
background runs are refused, each with a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidParams
from ...service import Delta, Done, Failed, Queued, Turn, TurnEvent
from ...service.structured import json_schema_grammar, response_format_grammar
from .protocol import OpenAIError, json_object, validated

STORE_PREFIX = "openai-response:"
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


class _InputPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_InputPart]
    id: str | None = None
    status: str | None = None


class ResponsesRequest(BaseModel):
    """The body of ``POST /v1/responses``; JSON types are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: str | list[InputMessage] = Field(min_length=1)
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = Field(None, max_length=100)
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    # Accepted only with the value that asks for nothing extra.
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning: Any = None
    include: list[str] | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    prompt: Any = None
    conversation: Any = None


_REFUSED = [
    ("tools", lambda v: bool(v), "tools on /v1/responses (use /v1/chat/completions)"),
    ("tool_choice", lambda v: v not in (None, "none", "auto"), "tools on /v1/responses (use /v1/chat/completions)"),
    ("reasoning", lambda v: v is not None, "reasoning"),
    ("include", lambda v: bool(v), "extra output ('include')"),
    ("background", lambda v: bool(v), "background responses"),
    ("top_logprobs", lambda v: v not in (None, 0), "log probabilities"),
    ("prompt", lambda v: v is not None, "prompt templates"),
    ("conversation", lambda v: v is not None, "conversations (use previous_response_id)"),
]


def parse_responses_request(body: bytes) -> ResponsesRequest:
    request = validated(ResponsesRequest, json_object(body), _REFUSED)
    return request


def format_grammar(request: ResponsesRequest) -> str | None:
    """The grammar for ``text.format`` (``text``, ``json_object``, or ``json_schema`` with ``name``/``schema``
    inline, as the Responses API has it). Raises :class:`InvalidParams` naming the field."""
    fmt = (request.text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidParams("'text.format': expected an object", param="text.format")
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise InvalidParams("'text.format.schema': expected a JSON schema object", param="text.format.schema")
        return json_schema_grammar(schema, strict=fmt.get("strict") is True, param="text.format.schema")
    return response_format_grammar({"type": fmt.get("type")}, param="text.format")


def input_messages(request: ResponsesRequest) -> list[dict[str, str]]:
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    out = []
    for item in request.input:
        content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
        out.append({"role": "system" if item.role == "developer" else item.role, "content": content})
    return out


def check_response_id(value: str, param: str = "previous_response_id") -> str:
    if not value.startswith("resp_") or not set(value) <= _ID_CHARS:
        raise OpenAIError(400, f"Invalid '{param}': {value!r} is not a response id.", param=param,
                          code="invalid_value")
    return value


class ResponseObject:
    """One response: its JSON object, and its stream of typed events."""

    def __init__(self, request: ResponsesRequest, model: str) -> None:
        self.request = request
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self._sequence = 0
        self._text: list[str] = []
        self._started = False

    def body(self, status: str, text: str = "", done: Done | None = None, error: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        r = self.request
        output = [] if status in ("in_progress", "failed") else [self._message(text, status)]
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "instructions": r.instructions,
            "previous_response_id": r.previous_response_id, "store": r.store is not False,
            "max_output_tokens": r.max_output_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "parallel_tool_calls": r.parallel_tool_calls is not False, "tool_choice": "auto", "tools": [],
            "text": r.text or {"format": {"type": "text"}}, "truncation": "disabled", "metadata": r.metadata or {},
            "user": r.user, "error": error, "reasoning": {"effort": None, "summary": None},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": None if done is None else {
                "input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": done.prompt_tokens + done.completion_tokens},
        }

    def _message(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    @staticmethod
    def status_of(done: Done) -> str:
        return "incomplete" if done.finish_reason == "length" else "completed"

    def _event(self, kind: str, **fields: Any) -> str:
        self._sequence += 1
        data = {"type": kind, "sequence_number": self._sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def encode_event(self, event: TurnEvent) -> str | None:
        out = ""
        if not self._started:
            self._started = True
            out += self._event("response.created", response=self.body("in_progress"))
            out += self._event("response.in_progress", response=self.body("in_progress"))
        if isinstance(event, Queued):
            return out or None
        if isinstance(event, Failed):
            error = {"code": event.code, "message": event.message}
            return out + self._event("response.failed", response=self.body("failed", error=error))
        item = {"output_index": 0, "item_id": self.message_id}
        if isinstance(event, Delta):
            if not self._text:
                out += self._event("response.output_item.added", output_index=0,
                                   item={**self._message("", "in_progress"), "content": []})
                out += self._event("response.content_part.added", **item, content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            self._text.append(event.text)
            return out + self._event("response.output_text.delta", **item, content_index=0, delta=event.text,
                                     logprobs=[])
        assert isinstance(event, Done)
        text, status = "".join(self._text), self.status_of(event)
        if not self._text:
            out += self._event("response.output_item.added", output_index=0,
                               item={**self._message("", "in_progress"), "content": []})
            out += self._event("response.content_part.added", **item, content_index=0,
                               part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        out += self._event("response.output_text.done", **item, content_index=0, text=text, logprobs=[])
        out += self._event("response.content_part.done", **item, content_index=0,
                           part={"type": "output_text", "text": text, "annotations": [], "logprobs": []})
        out += self._event("response.output_item.done", output_index=0, item=self._message(text, status))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, response=self.body(status, text, event))

    def whole(self, text: str, done: Done, logprobs: Any = ()) -> dict[str, Any]:
        return self.body(self.status_of(done), text, done)


class StoringTurn:
    """A turn whose ``Done`` waits for ``on_done(text, done)`` (the stored response) before it is sent,
    so a client that chains ``previous_response_id`` right after the answer finds it."""

    def __init__(self, turn: Turn, on_done: Callable[[str, Done], Awaitable[None]]) -> None:
        self.turn = turn
        self.on_done = on_done

    def cancel(self) -> None:
        self.turn.cancel()

    async def events(self) -> AsyncGenerator[TurnEvent, None]:
        text: list[str] = []
        async for event in self.turn.events():
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Done):
                await self.on_done("".join(text), event)
            yield event
