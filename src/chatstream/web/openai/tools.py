"""Tool calling on the OpenAI wire: tools into the prompt, tool calls out of the reply.

Tools reach the model through its own chat template (``tools=`` of ``apply_chat_template``) when
the template knows them; otherwise (SmolLM2's does not) a system message describes them the way
Hermes-style models are trained to read them, and tool calls and results in the history are
written as ``<tool_call>``/``<tool_response>`` text. Tool calls are parsed out of the reply in the
format the model writes, picked from the chat template (or the ``tool_call_parser`` setting):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen, Hermes, SmolLM3, ...)
- ``llama3_json``: a reply that is ``{"name": ..., "parameters": {...}}`` (Llama 3.1+), ``;``-separated
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``

Streaming holds back only text that may start a tool call; a call is sent whole when the reply ends.
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
    """Splits a streamed reply into text to send now and a tool-call part parsed at the end."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.marker = _MARKERS[fmt]
        self._held = ""  # text that may be the start of a call
        self._call_text: str | None = None  # from the call's start to the end, once seen
        self._sent_text = False

    def feed(self, text: str) -> str:
        """Add a delta; returns the part that can be sent as content now."""
        if self._call_text is not None:
            self._call_text += text
            return ""
        pending = self._held + text
        if self.fmt == "llama3_json" and not self._sent_text:
            stripped = pending.lstrip()
            if stripped.startswith("{") or stripped.startswith(self.marker):
                self._call_text, self._held = pending, ""
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
            self._call_text, self._held = pending[start:], ""
            return pending[:start]
        keep = next((k for k in range(min(len(self.marker) - 1, len(pending)), 0, -1)
                     if self.marker.startswith(pending[-k:])), 0)
        self._held = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]

    def finish(self) -> tuple[str, list[dict[str, str]]]:
        """At the end: ``(text still to send, calls)``."""
        if self._call_text is None:
            return self._held, []
        _, calls = parse_tool_calls(self._call_text, self.fmt)
        return ("", calls) if calls else (self._call_text, [])
