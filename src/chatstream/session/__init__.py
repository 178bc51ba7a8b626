"""Server-side sessions: a signed cookie names the session; a store keeps its data."""

from .middleware import Session, SessionMiddleware
from .store import MemorySessionStore, SessionData, SessionStore

__all__ = ["MemorySessionStore", "Session", "SessionData", "SessionMiddleware", "SessionStore"]
