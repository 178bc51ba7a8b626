"""prefers_plain_text: SSE by default; text only when asked for more strongly than SSE."""

from __future__ import annotations

import pytest

from chatstream.web.negotiation import prefers_plain_text


@pytest.mark.parametrize("accept, expected", [
    (None, False),
    ("", False),
    ("*/*", False),
    ("text/event-stream", False),
    ("text/plain", True),
    ("TEXT/PLAIN; charset=utf-8", True),
    ("text/plain, text/event-stream", False),                # a tie keeps the default
    ("text/plain, text/event-stream;q=0.5", True),
    ("text/plain;q=0.2, text/event-stream;q=0.9", False),
    ("text/plain;q=0, */*", False),                          # q=0 excludes text
    ("text/plain;q=0", False),
    ("text/*", False),                                       # both match equally
    ("text/*, text/event-stream;q=0", True),                 # SSE excluded, text allowed
    ("*/*;q=0.1, text/plain", True),
    ("application/json", False),
    ("text/plain;q=bogus", False),
    ("garbage, text/plain", True),
])
def test_accept_header(accept: str | None, expected: bool) -> None:
    assert prefers_plain_text(accept, None) is expected


@pytest.mark.parametrize("fmt, expected", [("text", True), ("sse", False), ("TEXT", True), ("json", False)])
def test_format_parameter_decides_outright(fmt: str, expected: bool) -> None:
    assert prefers_plain_text("text/plain", fmt) is expected
    assert prefers_plain_text("text/event-stream", fmt) is expected
