"""Server-side sessions: a signed cookie names the session; a store keeps its data."""

from ..errors import SessionBusy
from .data_dir import default_data_dir, load_or_create_secret
from .lease import Lease
from .memory_store import MemorySessionStore
from .middleware import Session, SessionMiddleware, TooManySessions
from .redis_store import RedisSessionStore
from .sqlite_store import SQLiteSessionStore
from .store import SessionData, SessionStore
from .store_url import store_from_url

__all__ = [
    "Lease",
    "MemorySessionStore",
    "RedisSessionStore",
    "SQLiteSessionStore",
    "Session",
    "SessionBusy",
    "SessionData",
    "SessionMiddleware",
    "SessionStore",
    "TooManySessions",
    "default_data_dir",
    "load_or_create_secret",
    "store_from_url",
]
