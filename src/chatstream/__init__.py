"""chatstream: streaming chat from pre-trained language models in FastAPI/Starlette apps."""

from .admission import AdmissionQueue, QueueFullError
from .conversation import ChatPrompt, PromptTooLongError
from .engine import Engine, GenerationOutput, SamplingParams
from .model_loader import load_model
from .session import MemorySessionStore, SessionMiddleware, SessionStore
from .settings import Settings
from .web import ChatStream
from .web.openai_api import add_openai_routes
from .web.ui import add_ui_routes

__all__ = [
    "AdmissionQueue",
    "ChatPrompt",
    "ChatStream",
    "Engine",
    "GenerationOutput",
    "MemorySessionStore",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "SessionMiddleware",
    "SessionStore",
    "Settings",
    "add_openai_routes",
    "add_ui_routes",
    "load_model",
]
__version__ = "0.1.0"
