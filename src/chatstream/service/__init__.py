"""The service layer: one ``ChatService`` and one ``Turn`` under every face."""

from .chat_service import ChatService
from .events import (
    DISCONNECTED_BEFORE_STREAMING,
    DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
    Delta,
    Done,
    Failed,
    Queued,
    TurnEvent,
)
from .turn import Callback, Turn

__all__ = [
    "Callback",
    "ChatService",
    "DISCONNECTED_BEFORE_STREAMING",
    "DISCONNECTED_WHILE_STREAMING",
    "Delta",
    "Done",
    "Failed",
    "Queued",
    "SUCCESS",
    "Turn",
    "TurnEvent",
    "UNKNOWN_ERROR",
]
