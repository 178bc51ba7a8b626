"""Structured output for every face: a ``response_format`` (OpenAI's shape) or a forced tool call
becomes an llguidance grammar in :attr:`SamplingParams.grammar`, which the engine enforces token by
token (see :mod:`chatstream.engine.core.grammar`). JSON comes out compact (no free whitespace: a small
model could otherwise pad forever); ``strict: false`` schemas tolerate keywords llguidance cannot
enforce (they are ignored), ``strict: true`` ones are refused when a keyword cannot be enforced.

The ``*_values`` functions give both fields a face sets on :class:`SamplingParams`: the ``grammar``
(the local engine enforces it) and the ``response_format`` it was made from, in OpenAI's chat wire
form (a remote engine sends that on: vLLM, llama.cpp's server and chatstream all enforce it). The
grammar is made either way, so a schema is refused the same way whichever engine serves it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.core.grammar import GrammarError, check_grammar
from ..errors import InvalidParams

MAX_SCHEMA_BYTES = 64 * 1024


def json_schema_grammar(schema: Mapping[str, Any], *, strict: bool = False, param: str = "response_format") -> str:
    """The grammar of JSON documents matching ``schema``; :class:`InvalidParams` naming ``param`` if unusable."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidParams(f"'{param}': the schema is larger than {MAX_SCHEMA_BYTES} bytes", param=param)
    try:
        return _compile(schema, strict=strict)
    except (GrammarError, ValueError, TypeError) as exc:
        raise InvalidParams(f"'{param}': the JSON schema cannot be enforced: {exc}", param=param) from None


def _compile(schema: Mapping[str, Any], *, strict: bool) -> str:
    import llguidance

    grammar: str = llguidance.LLMatcher.grammar_from_json_schema(
        dict(schema), defaults={"whitespace_flexible": False, "lenient": not strict})
    check_grammar(grammar)
    return grammar


# Schemas already checked by check_json_schema (their digest -> the problem, or None): a client
# sends the same tools with every request (Open WebUI: 36 of them, ~5 ms to compile).
_CHECKED: dict[str, str | None] = {}
_CHECKED_MAX = 4096


def check_json_schema(schema: Mapping[str, Any], *, param: str) -> None:
    """:class:`InvalidParams` naming ``param`` for a schema that is not valid JSON Schema: one that
    llguidance cannot compile (leniently, as a forced call of it would need), so that a tool offered
    with ``tool_choice: auto`` is refused as it would be if it were forced. Compiles: off the loop."""
    text = json.dumps(schema, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _CHECKED:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        problem = None
        if len(text) > MAX_SCHEMA_BYTES:
            problem = f"it is larger than {MAX_SCHEMA_BYTES} bytes"
        else:
            try:
                _compile(schema, strict=False)
            except (GrammarError, ValueError, TypeError) as exc:
                problem = str(exc)
        _CHECKED[key] = problem
    problem = _CHECKED[key]
    if problem is not None:
        raise InvalidParams(f"'{param}': not a valid JSON schema: {problem}", param=param)


def response_format_grammar(value: Any, param: str = "response_format") -> str | None:
    """The grammar for an OpenAI ``response_format``: ``text`` (none), ``json_object``, ``json_schema``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidParams(f"'{param}' must be an object like {{\"type\": \"json_object\"}}", param=param)
    kind = value.get("type")
    extra = set(value) - {"type", "json_schema"}
    if extra:
        raise InvalidParams(f"'{param}' has unknown fields: {', '.join(sorted(extra))}", param=f"{param}.{min(extra)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, param=param)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidParams(f"'{param}.json_schema' must be an object with a 'name' and a 'schema'",
                                param=f"{param}.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, Mapping):
            raise InvalidParams(f"'{param}.json_schema.schema' must be a JSON schema object",
                                param=f"{param}.json_schema.schema")
        return json_schema_grammar(schema, strict=spec.get("strict") is True, param=f"{param}.json_schema.schema")
    raise InvalidParams(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'", param=f"{param}.type")


def tool_call_grammar(functions: Sequence[Mapping[str, Any]], param: str = "tool_choice") -> str:
    """A grammar for one call, ``{"name": ..., "arguments": {...}}``, of one of ``functions``
    (OpenAI function definitions: ``name`` and a ``parameters`` schema)."""
    return json_schema_grammar(tool_call_schema(functions), param=param)


def tool_call_schema(functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call of one of ``functions``: what a forced ``tool_choice`` allows."""
    calls = [{
        "type": "object",
        "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for f in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def response_format_values(value: Any, param: str = "response_format") -> dict[str, str]:
    """``grammar`` and ``response_format`` for an OpenAI ``response_format``; empty for none or ``text``."""
    grammar = response_format_grammar(value, param)
    if grammar is None:
        return {}
    if value["type"] == "json_object":
        return {"grammar": grammar, "response_format": _compact({"type": "json_object"})}
    return {"grammar": grammar, "response_format": _compact({"type": "json_schema", "json_schema": dict(value["json_schema"])})}


def json_schema_values(schema: Mapping[str, Any], *, name: str, strict: bool = False,
                       param: str = "response_format") -> dict[str, str]:
    """``grammar`` and ``response_format`` for a JSON schema given on its own (the Responses API's ``text.format``)."""
    grammar = json_schema_grammar(schema, strict=strict, param=param)
    spec = {"name": name, "schema": dict(schema), "strict": strict}
    return {"grammar": grammar, "response_format": _compact({"type": "json_schema", "json_schema": spec})}


def tool_call_values(functions: Sequence[Mapping[str, Any]], param: str = "tool_choice") -> dict[str, str]:
    """``grammar`` and ``response_format`` for a forced call of one of ``functions``.

    Upstream, the call is a ``json_schema`` reply of the call's shape, which the front parses as it
    parses the local engine's: llama.cpp's server takes ``response_format`` as started, where
    forwarding ``tools`` needs its ``--jinja`` (and vLLM's ``tool_choice: auto`` needs a parser flag).
    """
    schema = tool_call_schema(functions)
    spec = {"name": "tool_call", "schema": schema}
    return {"grammar": json_schema_grammar(schema, param=param),
            "response_format": _compact({"type": "json_schema", "json_schema": spec})}


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
