"""chatstream: streaming chat from pre-trained language models in FastAPI/Starlette apps."""

from .admission import AdmissionQueue, QueueFullError
from .conversation import ChatPrompt, PromptTooLongError
from .engine import Engine, GenerationOutput, SamplingParams
from .model_loader import load_model
from .session import MemorySessionStore, SessionMiddleware, SessionStore
from .settings import Settings
from .web import ChatStream

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
    "load_model",
]
__version__ = "0.1.0"
