"""Content negotiation for ``/chat_stream``: Server-Sent Events by default, bare text on request."""

from __future__ import annotations

SSE = "text/event-stream"
PLAIN = "text/plain"


def _quality(accept: list[tuple[str, str, float]], media_type: str) -> float:
    """The q-value ``accept`` gives ``media_type``: that of the most specific matching range (RFC 9110 12.5.1)."""
    type_, _, subtype = media_type.partition("/")
    best, best_specificity = 0.0, -1
    for range_type, range_subtype, q in accept:
        if range_type == type_ and range_subtype == subtype:
            specificity = 2
        elif range_type == type_ and range_subtype == "*":
            specificity = 1
        elif range_type == "*" and range_subtype == "*":
            specificity = 0
        else:
            continue
        if specificity > best_specificity:
            best, best_specificity = q, specificity
    return best


def _parse_accept(header: str) -> list[tuple[str, str, float]]:
    ranges = []
    for item in header.lower().split(","):
        media_range, *params = item.split(";")
        range_type, slash, range_subtype = media_range.strip().partition("/")
        if not slash:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        ranges.append((range_type.strip(), range_subtype.strip(), q))
    return ranges


def prefers_plain_text(accept_header: str | None, format_param: str | None = None) -> bool:
    """Whether to stream bare text rather than SSE.

    ``?format=text`` (or ``?format=sse``) decides outright. Otherwise text wins only when the
    ``Accept`` header gives ``text/plain`` a higher q-value than ``text/event-stream``: no header,
    ``*/*``, a tie or ``text/plain;q=0`` all keep the default, SSE.
    """
    if format_param is not None:
        return format_param.strip().lower() in ("text", "plain", "text/plain")
    if not accept_header or not accept_header.strip():
        return False
    accept = _parse_accept(accept_header)
    return _quality(accept, PLAIN) > _quality(accept, SSE)
