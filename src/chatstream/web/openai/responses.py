"""OpenAI's Responses API: ``POST /v1/responses`` (whole or streamed as its typed events) and
``GET``/``DELETE /v1/responses/{id}``.

``instructions`` is a system message for this response only (not carried to the next, as OpenAI
does). With ``store`` (the default, as OpenAI's), the conversation so far (input and output, not
the instructions) is kept in chatstream's session store under its own key
(``openai-response:<id>``, for ``--session-ttl-s``), so ``previous_response_id`` continues it:
server-side state is what chatstream already keeps.

Function tools come in the Responses shape (``{"type": "function", "name", "parameters"}``) and go
through the chat wire's machinery: rendered by the chat template, calls parsed (and streamed, as
``response.function_call_arguments.delta`` events) into ``function_call`` output items;
``function_call`` and ``function_call_output`` input items become the assistant's calls and
``tool`` messages; ``tool_choice`` ``required`` or a named function is enforced by the grammar.
Other tool types, images, files, reasoning and background runs are refused, each with a 400
naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ...errors import InvalidParams
from ...service import Delta, Done, Failed, Queued, Turn, TurnEvent
from ...service.structured import json_schema_values, response_format_values, tool_call_values
from .protocol import (
    FunctionDefinition,
    OpenAIError,
    OpenAIRequest,
    Refusals,
    ServiceFields,
    check_tool_choice,
    check_tool_parameters,
    forced_functions,
    json_object,
    unsupported,
    validated,
)
from .tools import ToolCallStream, ToolFormat

STORE_PREFIX = "openai-response:"
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


class _InputPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None  # a reply's output_text sent back as input has them


_Parts = Annotated[list[_InputPart], Field(min_length=1)]


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | _Parts
    id: str | None = None
    status: str | None = None


class _CallItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    call_id: str = Field(min_length=1, max_length=100)
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_CallItem):
    """A call the model made earlier (a ``function_call`` output item sent back as input)."""

    type: Literal["function_call"]
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(_CallItem):
    """The result of a call, for the model to read (a ``tool`` message of the chat wire)."""

    type: Literal["function_call_output"]
    output: str | _Parts


def _item_type(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    return kind if kind in ("message", "function_call", "function_call_output") else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(FunctionDefinition):
    """One of ``tools`` in the Responses shape: the function's fields at the top level."""

    type: Literal["function"]


class _TextFormat(BaseModel):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its fields inline."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: str
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: _TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(OpenAIRequest, ServiceFields):
    """The body of ``POST /v1/responses``."""

    refused: ClassVar[Refusals] = (
        ("reasoning", lambda v: v is not None, "reasoning"),
        ("include", lambda v: bool(v), "extra output ('include')"),
        ("background", lambda v: bool(v), "background responses"),
        ("top_logprobs", lambda v: v not in (None, 0), "log probabilities"),
        ("prompt", lambda v: v is not None, "prompt templates"),
        ("conversation", lambda v: v is not None, "conversations (use previous_response_id)"),
    )

    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    store: bool | None = True
    previous_response_id: str | None = Field(None, max_length=100)
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    # Accepted only with the value that asks for nothing extra.
    reasoning: Any = None
    include: list[str] | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    prompt: Any = None
    conversation: Any = None

    def check(self) -> None:
        if self.text is not None and self.text.verbosity is not None:
            raise unsupported("text.verbosity", "verbosity")
        check_tool_choice(self.tool_choice, self.tools or [], nested=False)

    def token_limit(self) -> int | None:
        return self.max_output_tokens

    def token_limit_param(self) -> str:
        return "max_output_tokens"

    def forced_functions(self) -> list[dict[str, Any]]:
        """The functions one of which the reply must call (``tool_choice`` required or named); else none."""
        return forced_functions(self.tool_choice, self.tools or [], nested=False)

    def structured_output(self) -> dict[str, str]:
        forced = self.forced_functions()
        values = tool_call_values(forced) if forced else {}
        check_tool_parameters(self.tools or [], "tools[{}].parameters")
        return values if forced else format_values(self)

    def compiles_schemas(self) -> bool:
        fmt = self.text.format if self.text is not None else None
        return bool(self.forced_functions()) or any(t.parameters for t in self.tools or []) \
            or (fmt is not None and fmt.type != "text")

    @property
    def grammar_param(self) -> str:
        return "tool_choice" if self.forced_functions() else "text.format"


def parse_responses_request(body: bytes, max_messages: int) -> ResponsesRequest:
    """Validate a request body (the item count first, before the schema walks every item)."""
    data = json_object(body)
    items = data.get("input")
    if isinstance(items, list) and len(items) > max_messages:
        raise OpenAIError(400, f"Invalid 'input': {len(items)} items; this server accepts at most {max_messages}.",
                          param="input", code="too_many_messages")
    for i, tool in enumerate(data.get("tools") or [] if isinstance(data.get("tools"), list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise OpenAIError(400, f"Unsupported parameter 'tools[{i}].type': this server does not support "
                              f"'{kind}' tools (only 'function').", param=f"tools[{i}].type",
                              code="unsupported_parameter")
    return validated(ResponsesRequest, data)


def chat_tools(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The tools in the chat wire's shape, as the prompt describes them (none with ``tool_choice: none``)."""
    if request.tool_choice == "none":
        return []
    return [{"type": "function", "function": t.definition()} for t in request.tools or []]


def format_values(request: ResponsesRequest) -> dict[str, str]:
    """The ``grammar`` and ``response_format`` for ``text.format`` (``text``, ``json_object``, or
    ``json_schema`` with ``name``/``schema`` inline, as the Responses API has it). Raises
    :class:`InvalidParams` naming the field."""
    fmt = request.text.format if request.text is not None else None
    if fmt is None:
        return {}
    if fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise InvalidParams("'text.format.schema': expected a JSON schema object", param="text.format.schema")
        return json_schema_values(fmt.schema_, name=fmt.name or "response", strict=fmt.strict is True,
                                  param="text.format.schema")
    return response_format_values({"type": fmt.type}, param="text.format")


def input_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The input as chat messages: ``function_call`` items become the assistant's ``tool_calls``
    (joined to the assistant message before them), ``function_call_output`` items ``tool`` messages."""
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    out: list[dict[str, Any]] = []
    for item in request.input:
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        else:
            content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            out.append({"role": "system" if item.role == "developer" else item.role, "content": content})
    return out


def check_response_id(value: str, param: str = "previous_response_id") -> str:
    if not value.startswith("resp_") or not set(value) <= _ID_CHARS or len(value) > 100:
        raise OpenAIError(400, f"Invalid '{param}': {value[:120]!r} is not a response id.", param=param,
                          code="invalid_value")
    return value


class ResponseObject:
    """One response: its JSON object, and its stream of typed events.

    Output items are built as the reply streams: a ``message`` for text, then a ``function_call``
    item for each call (its arguments streamed as they are generated). :meth:`complete` ends it,
    once, for the stored copy and for the last events alike.
    """

    def __init__(self, request: ResponsesRequest, model: str, tools: ToolFormat | None = None,
                 forced: bool = False) -> None:
        self.request = request
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self._sequence = 0
        self._started = False
        self._calls = ToolCallStream(tools or "hermes", forced=forced,
                                     parallel=request.parallel_tool_calls is not False) \
            if tools is not None or forced else None
        self._fed = 0  # characters of the reply seen so far
        self.items: list[dict[str, Any]] = []  # output items, as they are so far
        self._message: int | None = None  # index of the open message item
        self._call: int | None = None  # index of the function_call item whose arguments stream
        self._end: tuple[str, dict[str, Any]] | None = None  # the last events and the final body

    def body(self, status: str, done: Done | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object, shaped as OpenAI's published ``Response`` schema has it (fields it does
        not let be null, ``user`` and ``usage``, are left out until there is a value)."""
        r = self.request
        output = [] if status in ("in_progress", "failed") else self.items
        body = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "instructions": r.instructions,
            "previous_response_id": r.previous_response_id, "store": r.store is not False,
            "max_output_tokens": r.max_output_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "parallel_tool_calls": r.parallel_tool_calls is not False, "tool_choice": r.tool_choice or "auto",
            "tools": [{**t.model_dump(exclude_none=True), "parameters": t.parameters, "strict": t.strict}
                      for t in r.tools or []],
            "text": r.text.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format
            else {"format": {"type": "text"}}, "truncation": "disabled", "metadata": r.metadata or {},
            "error": error, "reasoning": {"effort": None, "summary": None},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        }
        if r.user is not None:
            body["user"] = r.user
        if done is not None:
            body["usage"] = {
                "input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": done.prompt_tokens + done.completion_tokens}
        return body

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
            # OpenAI's error codes for a response are a fixed list: ours goes in the message.
            error = {"code": "server_error", "message": f"{event.message} ({event.code})"}
            return out + self._event("response.failed", response=self.body("failed", error=error))
        if isinstance(event, Delta):
            return out + self._feed(event.text)
        return out + self.complete("", event)[0]

    def complete(self, text: str, done: Done) -> tuple[str, dict[str, Any]]:
        """End the response: ``text`` is the whole reply (what was not streamed yet is fed first).
        Returns the last events and the final body; later calls return the same."""
        if self._end is None:
            out = self._feed(text[self._fed:]) if len(text) > self._fed else ""
            status = self.status_of(done)
            if self._calls is not None:
                rest, deltas = self._calls.finish()
                out += self._text(rest) + self._call_deltas(deltas)
            out += self._close_call()
            if not self.items:
                out += self._text("", force=True)
            out += self._close_message(status)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            final = self.body(status, done)
            self._end = (out + self._event(kind, response=final), final)
        return self._end

    def whole(self, text: str, done: Done, logprobs: Any = ()) -> dict[str, Any]:
        return self.complete(text, done)[1]

    def chat_message(self) -> dict[str, Any]:
        """The reply as the chat wire's assistant message (text and ``tool_calls``), to be stored."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}

    # -- building the output items --
    def _feed(self, text: str) -> str:
        self._fed += len(text)
        if self._calls is None:
            return self._text(text)
        content, deltas = self._calls.feed(text)
        return self._text(content) + self._call_deltas(deltas)

    def _text(self, text: str, force: bool = False) -> str:
        if not text and not force:
            return ""
        out = ""
        if self._message is None:
            self._message = len(self.items)
            message_id = f"msg_{uuid.uuid4().hex}"
            self.items.append({"type": "message", "id": message_id, "status": "in_progress", "role": "assistant",
                               "content": []})
            out += self._event("response.output_item.added", output_index=self._message, item=dict(self.items[-1]))
            self.items[-1]["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]
            out += self._event("response.content_part.added", **self._where(), content_index=0,
                               part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        if not text:
            return out
        self.items[self._message]["content"][0]["text"] += text
        return out + self._event("response.output_text.delta", **self._where(), content_index=0, delta=text,
                                 logprobs=[])

    def _where(self) -> dict[str, Any]:
        assert self._message is not None
        return {"output_index": self._message, "item_id": self.items[self._message]["id"]}

    def _close_message(self, status: str) -> str:
        if self._message is None or self.items[self._message]["status"] != "in_progress":
            return ""
        item = self.items[self._message]
        part = item["content"][0]
        item["status"] = status
        return (self._event("response.output_text.done", **self._where(), content_index=0, text=part["text"],
                            logprobs=[])
                + self._event("response.content_part.done", **self._where(), content_index=0, part=part)
                + self._event("response.output_item.done", output_index=self._message, item=item))

    def _call_deltas(self, deltas: list[dict[str, Any]]) -> str:
        out = ""
        for delta in deltas:
            if "id" in delta:  # a new call: the text before it is complete
                out += self._close_call() + self._close_message("completed")
                self._call = len(self.items)
                self.items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": delta["id"],
                                   "name": delta["function"]["name"], "arguments": "", "status": "in_progress"})
                out += self._event("response.output_item.added", output_index=self._call, item=dict(self.items[-1]))
            elif self._call is not None and delta["function"]["arguments"]:
                item = self.items[self._call]
                item["arguments"] += delta["function"]["arguments"]
                out += self._event("response.function_call_arguments.delta", output_index=self._call,
                                   item_id=item["id"], delta=delta["function"]["arguments"])
        return out

    def _close_call(self) -> str:
        if self._call is None:
            return ""
        index, item = self._call, self.items[self._call]
        self._call, item["status"] = None, "completed"
        return (self._event("response.function_call_arguments.done", output_index=index, item_id=item["id"],
                            name=item["name"], arguments=item["arguments"])
                + self._event("response.output_item.done", output_index=index, item=item))


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
