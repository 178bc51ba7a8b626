"""One log line per chat turn, for the operator: how it ended, its tokens, speed, queue wait and first token.

Written as ``key=value`` pairs (logfmt), so that ``grep outcome=`` or a log shipper can read it::

    turn id=3f2a9c1e face=chat_stream outcome=success finish=stop prompt_tokens=412 completion_tokens=96
    tok_s=31.5 queue_s=0.000 ttft_s=0.212
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .turn import Turn

logger = logging.getLogger("chatstream.turn")


def turn_line(turn: Turn) -> str:
    """The log line of a turn that has ended."""
    fields: dict[str, object] = {"id": turn.message_id[:8], "face": turn.face, "outcome": turn.outcome or "unknown_error"}
    done, failure = turn.done, turn.failure
    if done is not None:
        timing = done.timing
        fields.update(finish=done.finish_reason, prompt_tokens=done.prompt_tokens,
                      completion_tokens=done.completion_tokens, tok_s=timing.get("tokens_per_s"),
                      queue_s=_seconds(timing.get("queue_s")), ttft_s=_seconds(timing.get("ttft_s")))
    else:
        if failure is not None:
            fields["error"] = failure.code
        fields.update(prompt_tokens=turn.prompt_tokens, sent_chars=len(turn.sent_text))
    return "turn " + " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())


def log_turn(turn: Turn) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s", turn_line(turn))


def _seconds(value: object) -> str | None:
    return f"{value:.3f}" if isinstance(value, (int, float)) else None
