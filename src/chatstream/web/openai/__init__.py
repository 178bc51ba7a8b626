"""The OpenAI-compatible API: the wire (``protocol``) and the routes over one ``ChatService``."""

from .protocol import ChatCompletionRequest, OpenAIError, parse_chat_completion_request
from .routes import OpenAIRoutes, add_openai_routes

__all__ = ["ChatCompletionRequest", "OpenAIError", "OpenAIRoutes", "add_openai_routes", "parse_chat_completion_request"]
