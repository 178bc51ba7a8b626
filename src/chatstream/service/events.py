"""What a turn tells its face while it runs: queue positions, text, and how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The completion callback's messages (the seed API's vocabulary).
SUCCESS = "success"
DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR = "unknown_error_occurred"


@dataclass(frozen=True)
class Queued:
    """The turn waits for a slot; ``position`` is 1-based and only sent when it changes."""

    position: int


@dataclass(frozen=True)
class Delta:
    """New text only: all deltas of a turn concatenate to its reply."""

    text: str
    logprobs: tuple[dict[str, Any], ...] = ()  # the tokens sampled since the last event (when asked for)


@dataclass(frozen=True)
class Done:
    """The reply ended normally (``finish_reason`` is ``stop`` or ``length``)."""

    finish_reason: str
    message_id: str
    prompt_tokens: int
    completion_tokens: int
    timing: dict[str, Any] = field(default_factory=dict)
    logprobs: tuple[dict[str, Any], ...] = ()  # of tokens that came with no text (e.g. a stop string's)


@dataclass(frozen=True)
class Failed:
    """The reply ended early after the stream began; text streamed so far was kept."""

    code: str
    message: str
    param: str | None = None  # the request field at fault, for ``invalid_request``


TurnEvent = Queued | Delta | Done | Failed
