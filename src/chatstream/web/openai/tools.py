"""Tool calling on the OpenAI wire: tools into the prompt, tool calls out of the reply.

Tools reach the model through its own chat template (``tools=`` of ``apply_chat_template``) when
the template knows them; otherwise (SmolLM2's does not) a system message describes them the way
Hermes-style models are trained to read them, and tool calls and results in the history are
written as ``<tool_call>``/``<tool_response>`` text. Tool calls are parsed out of the reply in the
format the model writes, picked from the chat template (or the ``tool_call_parser`` setting):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen, Hermes, SmolLM3, ...)
- ``llama3_json``: a reply that is ``{"name": ..., "parameters": {...}}`` (Llama 3.1+), ``;``-separated
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``

Streaming holds back only text that may start a tool call; a call's name goes out as soon as it is
written, then its arguments in fragments as they are generated (:class:`ToolCallStream`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

ToolFormat = Literal["hermes", "llama3_json", "mistral"]
TOOL_FORMATS: tuple[ToolFormat, ...] = ("hermes", "llama3_json", "mistral")


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def tool_format(tokenizer: Any, setting: str | None = None) -> ToolFormat:
    """The format to parse: the setting if it names one, else what the chat template writes."""
    if setting in TOOL_FORMATS:
        return setting
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" not in template and ("<|python_tag|>" in template or "ipython" in template):
        return "llama3_json"
    return "hermes"


_HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def template_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                      native: bool) -> list[dict[str, Any]]:
    """Messages as the chat template gets them.

    ``native``: the template handles ``tools``, ``tool_calls`` and ``tool`` messages itself (the
    arguments are given as objects, as HF templates expect). Otherwise everything is written as
    text in the Hermes style, and the tools are described in the system message.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if native:
            copy = {k: v for k, v in message.items() if v is not None}
            if calls:
                copy["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
                    "name": c["function"]["name"], "arguments": _as_object(c["function"]["arguments"])}}
                    for c in calls]
                copy["content"] = copy.get("content") or ""
            out.append(copy)
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif calls:
            text = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                              "arguments": _as_object(c["function"]["arguments"])}) + "\n</tool_call>"
                for c in calls)
            out.append({"role": "assistant", "content": ((message.get("content") or "") + "\n" + text).strip()})
        else:
            out.append({"role": message["role"], "content": message.get("content") or ""})
    if tools and not native:
        described = _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _as_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


# -- parsing ---------------------------------------------------------------------------------------

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MARKERS: dict[ToolFormat, str] = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": "<|python_tag|>"}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(obj: Any, args_key: str = "arguments") -> dict[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return {"name": obj["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in ``text`` (separated by whitespace, ``;`` or ``,``); None if it is anything else."""
    decoder, values, i = json.JSONDecoder(), list[Any](), 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str | None, list[dict[str, str]]]:
    """``(content, calls)`` of a whole reply; a reply with no well-formed call is all content."""
    calls: list[dict[str, str]] = []
    content = text
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start >= 0:
            for body in _HERMES_CALL.findall(text[start:]):
                values = _json_values(body)
                calls += [c for c in (_call(v) for v in values or []) if c is not None]
            content = text[:start]
    elif fmt == "mistral":
        start = text.find("[TOOL_CALLS]")
        if start >= 0:
            values = _json_values(text[start + len("[TOOL_CALLS]"):]) or []
            flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
            calls = [c for c in (_call(v) for v in flat) if c is not None]
            content = text[:start]
    else:
        body = text.strip().removeprefix("<|python_tag|>")
        if body.startswith("{"):
            values = _json_values(body) or []
            calls = [c for c in (_call(v, "parameters") for v in values) if c is not None]
            if len(calls) != len(values):
                calls = []
            content = ""
    if not calls:
        return text, []
    return (content.strip() or None), calls


def parse_forced_call(text: str) -> list[dict[str, str]]:
    """The call of a reply constrained to ``{"name", "arguments"}`` JSON (``tool_choice`` forced)."""
    values = _json_values(text) or []
    return [c for c in (_call(v) for v in values) if c is not None]


class ToolCallStream:
    """Splits a streamed reply into content to send now and tool-call deltas, as OpenAI streams them:
    a call's first delta has its ``id``, ``type`` and ``function.name`` with empty ``arguments``, and
    the arguments follow in fragments as the model writes them (not the whole call at the end).

    ``forced``: the whole reply is one call's ``{"name", "arguments"}`` JSON (a grammar made it so).
    ``parallel=False`` (``parallel_tool_calls: false``): calls after the first are dropped.
    A call region in which no call could be read is sent as content at the end, as the whole parse does.
    """

    def __init__(self, fmt: ToolFormat, *, forced: bool = False, parallel: bool = True) -> None:
        self.fmt = fmt
        self.marker = _MARKERS[fmt]
        self._held = ""  # text that may be the start of a call
        self._in_calls = forced  # past the start of the call region
        self._raw = ""  # the call region as written
        self._sent_text = False
        self._scanner = _CallScanner(max_calls=None if parallel else 1)

    @property
    def calls(self) -> list[dict[str, str]]:
        """The calls streamed so far: ``{"id", "name", "arguments"}``."""
        return self._scanner.calls

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Add a delta; returns ``(content to send now, tool-call deltas to send now)``."""
        if self._in_calls:
            return "", self._scan(text)
        content = self._split(text)
        if self._in_calls:
            pending, self._held = self._held, ""
            return content, self._scan(pending)
        return content, []

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: ``(content still to send, tool-call deltas still to send)``."""
        if not self._in_calls:
            return self._held, []
        deltas = self._scanner.finish()
        return ("", deltas) if self._scanner.calls else (self._raw, [])

    def _scan(self, text: str) -> list[dict[str, Any]]:
        self._raw += text
        return self._scanner.feed(text)

    def _split(self, text: str) -> str:
        """Content before the call region; on finding its start, keeps the rest in ``_held``."""
        pending = self._held + text
        if self.fmt == "llama3_json" and not self._sent_text:
            stripped = pending.lstrip()
            if stripped.startswith("{") or stripped.startswith(self.marker):
                self._in_calls, self._held = True, stripped
                return ""
            if not stripped or self.marker.startswith(stripped):
                self._held = pending
                return ""
            self._sent_text = True  # Llama 3 calls come first or not at all
            self._held = ""
            return pending
        if self.fmt == "llama3_json":
            return pending
        start = pending.find(self.marker)
        if start >= 0:
            self._in_calls, self._held = True, pending[start + len(self.marker):]
            self._raw = self.marker
            return pending[:start]
        keep = next((k for k in range(min(len(self.marker) - 1, len(pending)), 0, -1)
                     if self.marker.startswith(pending[-k:])), 0)
        self._held = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]


_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')


class _CallScanner:
    """Reads call objects (``{"name": ..., "arguments": ...}``) out of a call region character by
    character, whatever separates them (tags, ``[``, ``,``, ``;``, whitespace: skipped). Once the
    name is known its header delta goes out; the arguments' JSON text is passed on as it comes. An
    object with its arguments before its name is sent whole when it closes."""

    def __init__(self, max_calls: int | None) -> None:
        self.max_calls = max_calls
        self.calls: list[dict[str, str]] = []
        self._state = "seek"  # seek | head | args | tail | done
        self._buf = ""  # head: the object so far; args: a string or scalar value so far
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._args_kind = ""  # "{"/"[": streamed; '"' or "scalar": sent once complete

    def feed(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for char in text:
            if self._state == "done":
                break
            if self._state == "seek":
                if char == "{":
                    self._state, self._buf, self._depth, self._in_string = "head", "{", 1, False
                continue
            if self._state == "head":
                self._buf += char
                closed = self._track(char)
                match = _CALL_HEAD.match(self._buf)
                if match:
                    out.append(self._start(json.loads(f'"{match.group(1)}"')))
                    self._state, self._args_kind, self._buf = "args", "", ""
                elif closed:
                    out += self._whole(self._buf)
                continue
            if self._state == "args":
                piece = self._args_char(char)
                if piece:
                    out.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
                continue
            if self._track(char):  # tail: the rest of the call object
                self._end_call()
        return _merge(out)

    def finish(self) -> list[dict[str, Any]]:
        """A value cut off (the reply hit its token limit): what there is of it."""
        if self._state == "args" and self._args_kind in ('"', "scalar") and self._buf:
            value, self._buf = self._buf, ""
            if self._args_kind == '"':  # a string's content, as when whole
                try:
                    value = str(json.loads(value.removesuffix("\\") + '"'))
                except ValueError:
                    value = value[1:]
            self.calls[-1]["arguments"] += value
            return [{"index": len(self.calls) - 1, "function": {"arguments": value}}]
        return []

    def _track(self, char: str) -> bool:
        """Follow JSON nesting; True when this character closes the outermost value."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
            return False
        if char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            return self._depth == 0
        return False

    def _args_char(self, char: str) -> str:
        """One character of the arguments value: returned when it is to be streamed now."""
        if not self._args_kind:
            if char.isspace():
                return ""
            self._args_kind = char if char in '{["' else "scalar"
            self._depth, self._in_string, self._escaped = 0, False, False
        if self._args_kind in "{[":
            closed = self._track(char)
            self.calls[-1]["arguments"] += char
            if closed:
                self._state, self._depth = "tail", 1
            return char
        if self._args_kind == '"':  # arguments given as a JSON string: send the string's content, once whole
            self._buf += char
            if len(self._buf) == 1:
                return ""
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                return self._string_done()
            return ""
        if char in ",}":
            self.calls[-1]["arguments"] += self._buf
            value, self._buf, self._state, self._depth = self._buf, "", "tail", 1
            if char == "}":
                self._end_call()
            return value
        self._buf += char
        return ""

    def _string_done(self) -> str:
        try:
            value = json.loads(self._buf)
        except ValueError:
            value = self._buf
        self._buf, self._state, self._depth = "", "tail", 1
        self.calls[-1]["arguments"] += str(value)
        return str(value)

    def _start(self, name: str) -> dict[str, Any]:
        call_id = new_call_id()
        self.calls.append({"id": call_id, "name": name, "arguments": ""})
        return {"index": len(self.calls) - 1, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""}}

    def _whole(self, text: str) -> list[dict[str, Any]]:
        self._end_call()
        values = _json_values(text) or []
        call = _call(values[0]) if values else None
        if call is None:
            return []
        head = self._start(call["name"])
        self.calls[-1]["arguments"] = call["arguments"]
        self._end_call()
        return [head, {"index": head["index"], "function": {"arguments": call["arguments"]}}]

    def _end_call(self) -> None:
        done = self.max_calls is not None and len(self.calls) >= self.max_calls
        self._state, self._buf, self._depth, self._in_string = ("done" if done else "seek"), "", 0, False


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Argument fragments of one call in one feed as one delta (a header keeps its own)."""
    out: list[dict[str, Any]] = []
    for delta in deltas:
        if out and "id" not in delta and out[-1]["index"] == delta["index"] and "id" not in out[-1]:
            out[-1]["function"]["arguments"] += delta["function"]["arguments"]
        else:
            out.append(delta)
    return out
