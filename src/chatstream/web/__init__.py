"""The HTTP faces: the seed API ``ChatStream`` (``/chat_stream``), the OpenAI API, the UI, the app."""

from ..service.events import (
    DISCONNECTED_BEFORE_STREAMING,
    DISCONNECTED_WHILE_STREAMING,
    SUCCESS,
    UNKNOWN_ERROR,
)
from .chat_stream import ChatStream

__all__ = [
    "ChatStream",
    "DISCONNECTED_BEFORE_STREAMING",
    "DISCONNECTED_WHILE_STREAMING",
    "SUCCESS",
    "UNKNOWN_ERROR",
]
