"""parse_json_body: every bad body is a BadJSON with a clear message, never another exception."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatstream.web.json_body import BadJSON, is_json_media_type, parse_json_body


def test_parses_ordinary_json() -> None:
    body = json.dumps({"user_input": "héllo 😀", "n": [1, 2.5, None, True]}, ensure_ascii=False).encode()
    assert parse_json_body(body) == {"user_input": "héllo 😀", "n": [1, 2.5, None, True]}


def test_accepts_escaped_surrogate_pairs() -> None:
    assert parse_json_body(b'"\\ud83d\\ude00"') == "😀"


@pytest.mark.parametrize("body, words", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"", "empty"),
    (b"   ", "empty"),
    (b'{"a": }', "not valid JSON"),
    (b'{"a": 1', "not valid JSON"),
    (b'{"a": 1} trailing', "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper than 32"),
    (b'{"a":' * 33 + b"1" + b"}" * 33, "nested deeper than 32"),
    (b'"\\ud800"', "lone UTF-16 surrogate"),
    (b'{"x": ["ok", {"\\udfff": 1}]}', "lone UTF-16 surrogate"),
    (b'"\\ude00\\ud83d"', "lone UTF-16 surrogate"),
    (b"1" * 5000, "more than 4300 digits"),
    (b"[-" + b"9" * 4301 + b"]", "more than 4300 digits"),
    (b"1e999", "out of range"),
    (b"-1e999", "out of range"),
    (b"NaN", "NaN is not valid JSON"),
    (b"[Infinity]", "Infinity is not valid JSON"),
    (b"{\"a\": -Infinity}", "-Infinity is not valid JSON"),
])
def test_rejects_bad_bodies_with_a_message_naming_the_problem(body: bytes, words: str) -> None:
    with pytest.raises(BadJSON, match=words.replace("(", r"\(")):
        parse_json_body(body)


def test_depth_is_measured_outside_strings() -> None:
    assert parse_json_body(json.dumps({"text": "[[[[" * 1000}).encode()) == {"text": "[[[[" * 1000}
    assert parse_json_body(b"[" * 32 + b"]" * 32) is not None


def test_the_depth_scan_is_linear_on_unterminated_strings_full_of_escaped_quotes() -> None:
    started = time.monotonic()
    with pytest.raises(BadJSON, match="not valid JSON"):
        parse_json_body(b'["' + b'\\"' * 1_000_000)  # 2 MB; the quadratic scan took hours
    with pytest.raises(BadJSON, match="not valid JSON"):
        parse_json_body(b'["' + b'\\"' * 1_000_000 + b"\\")
    assert time.monotonic() - started < 10


def test_recursion_backstop_with_a_huge_depth_limit() -> None:
    with pytest.raises(BadJSON):
        parse_json_body(b"[" * 100_000 + b"]" * 100_000, max_depth=1_000_000)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_bad_json(body: bytes) -> None:
    try:
        parse_json_body(body)
    except BadJSON as exc:
        assert str(exc)


_JSONISH = st.lists(st.sampled_from([
    "{", "}", "[", "]", ",", ":", '"', "\\", "\\u", "d800", "dc00", "0", "-", "1e", "999", ".", "5",
    "NaN", "Infinity", "true", "null", " ", "a", "é", "\ud800", "\x00", "9" * 50,
]), max_size=60).map("".join)


@settings(max_examples=400, deadline=None)
@given(_JSONISH, st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_json_like_text_parses_or_raises_bad_json(text: str, encoding: str) -> None:
    try:
        body = text.encode(encoding, errors="surrogatepass")
    except UnicodeEncodeError:
        return
    try:
        parse_json_body(body, max_depth=4)
    except BadJSON as exc:
        assert str(exc)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.booleans())
def test_valid_json_round_trips(value: object, ensure_ascii: bool) -> None:
    assert parse_json_body(json.dumps(value, ensure_ascii=ensure_ascii).encode()) == value


@pytest.mark.parametrize("content_type, ok", [
    ("application/json", True),
    ("Application/JSON; charset=utf-8", True),
    ("application/merge-patch+json", True),
    ("application/json; charset=latin-1", False),
    ("text/plain", False),
    ("application/x-www-form-urlencoded", False),
    ("multipart/form-data; boundary=x", False),
    ("", False),
])
def test_json_media_types(content_type: str, ok: bool) -> None:
    assert is_json_media_type(content_type) is ok
