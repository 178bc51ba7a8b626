"""HTTP layer: routes, request validation, response encoders, and the seed API ``ChatStream``."""

from .chat_stream import ChatStream
from .chat_turn import (
    DISCONNECTED_BEFORE_STREAMING,
    DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
)

__all__ = [
    "ChatStream",
    "DISCONNECTED_BEFORE_STREAMING",
    "DISCONNECTED_WHILE_STREAMING",
    "SUCCESS",
    "UNKNOWN_ERROR",
]
