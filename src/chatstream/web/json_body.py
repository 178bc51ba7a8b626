"""Request bodies as JSON: a parser that answers every bad input with :class:`BadJSON`, never a 500.

``json.loads`` alone is not enough for untrusted bodies: it recurses once per nesting level
(``RecursionError`` on deep input), accepts ``NaN``/``Infinity`` and ``1e999`` (which becomes
``inf``), lets lone surrogates such as ``"\\ud800"`` through to fail later in the tokenizer, and
raises ``ValueError`` from ``int()`` on numbers past Python's digit limit.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .http_errors import json_error

MAX_NUMBER_DIGITS = 4300  # CPython's default int-from-string limit (sys.int_info.default_max_str_digits)

# A JSON string literal, unrolled so the regex engine never backtracks per character. The closing
# quote is optional: an unterminated string is consumed to the end in one match, instead of the
# search failing and retrying from every later (escaped) quote, which is quadratic.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadJSON(ValueError):
    """The body is not acceptable JSON; ``str(exc)`` says why, in words fit for the client."""


def parse_json_body(body: bytes, max_depth: int = 32, max_number_digits: int = MAX_NUMBER_DIGITS) -> Any:
    """Parse a request body as strict JSON (RFC 8259, UTF-8), or raise :class:`BadJSON`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJSON(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    if not text.strip():
        raise BadJSON("The request body is empty; expected a JSON document.")
    # Measure the nesting before parsing: strings are cut out first so brackets inside them don't count.
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if brackets and max(accumulate(map(_BRACKET_STEP.__getitem__, brackets))) > max_depth:
        raise BadJSON(f"The JSON document is nested deeper than {max_depth} levels.")

    def parse_int(literal: str) -> int:
        if len(literal.lstrip("-")) > max_number_digits:
            raise BadJSON(f"A number in the JSON document has more than {max_number_digits} digits.")
        return int(literal)

    def parse_float(literal: str) -> float:
        if len(literal) > max_number_digits:
            raise BadJSON(f"A number in the JSON document has more than {max_number_digits} digits.")
        value = float(literal)
        if not math.isfinite(value):
            raise BadJSON(f"The number {literal[:40]} is out of range.")
        return value

    def parse_constant(name: str) -> Any:
        raise BadJSON(f"{name} is not valid JSON (only finite numbers are).")

    try:
        value = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except json.JSONDecodeError as exc:
        raise BadJSON(f"The request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") from None
    except RecursionError:  # only reachable with a max_depth near the interpreter's recursion limit
        raise BadJSON("The JSON document is nested too deeply.") from None
    if "\\u" in text:  # lone surrogates can only arrive as escapes: raw ones fail UTF-8 decoding
        _reject_lone_surrogates(value)
    return value


def _reject_lone_surrogates(value: Any) -> None:
    # Recursion is bounded: the depth was checked before parsing.
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise BadJSON("A string in the JSON document contains a lone UTF-16 surrogate escape (such as "
                          "\\ud800), which is not a character.")
    elif isinstance(value, list):
        for item in value:
            _reject_lone_surrogates(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_lone_surrogates(key)
            _reject_lone_surrogates(item)


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or any ``application/*+json``, in UTF-8 (the only charset JSON has)."""
    media_type, _, params = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and media_type.endswith("+json")):
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def require_json(request: Request) -> JSONResponse | None:
    """The 415 answer for a body that is declared as something other than JSON, else ``None``.

    A missing ``Content-Type`` is accepted (clients that send JSON without saying so), but a
    form or text type is not: browsers can send those cross-site without a CORS preflight.
    """
    content_type = request.headers.get("content-type")
    if content_type is None or is_json_media_type(content_type):
        return None
    return json_error(
        request.scope, 415, "unsupported_media_type",
        f"Content-Type {content_type.split(';')[0].strip()!r} is not supported: send 'application/json'.",
    )
