"""chatstream: streaming chat from pre-trained language models in FastAPI/Starlette apps."""

__version__ = "0.2.0"

from .admission import AdmissionQueue, QueueFullError
from .conversation import ChatPrompt, PromptTooLongError
from .engine import Engine, GenerationOutput, SamplingParams
from .errors import (
    ChatError,
    ConversationTooLong,
    InputTooLarge,
    InvalidParams,
    InvalidRequest,
    ModelNotReady,
    NothingToRegenerate,
    PromptTooLong,
    QueueFull,
    SessionBusy,
)
from .model_loader import load_model
from .service import ChatService, Turn
from .session import MemorySessionStore, SessionMiddleware, SessionStore
from .settings import Settings
from .web import ChatStream
from .web.openai import add_openai_routes
from .web.ui import add_ui_routes

__all__ = [
    "AdmissionQueue",
    "ChatError",
    "ChatPrompt",
    "ChatService",
    "ChatStream",
    "ConversationTooLong",
    "Engine",
    "GenerationOutput",
    "InputTooLarge",
    "InvalidParams",
    "InvalidRequest",
    "MemorySessionStore",
    "ModelNotReady",
    "NothingToRegenerate",
    "PromptTooLong",
    "PromptTooLongError",
    "QueueFull",
    "QueueFullError",
    "SamplingParams",
    "SessionBusy",
    "SessionMiddleware",
    "SessionStore",
    "Settings",
    "Turn",
    "add_openai_routes",
    "add_ui_routes",
    "load_model",
]
