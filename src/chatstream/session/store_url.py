"""Pick a session store from one URL, as ``--session-store`` / ``CHATSTREAM_SESSION_STORE`` give it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from .store import SessionStore

ACCEPTED_FORMS = (
    "memory:// (this process only), "
    "sqlite:// (the file sessions.db in the data folder), "
    "sqlite:///absolute/path.db, "
    "redis://[:password@]host:port/db or rediss://... (TLS), optionally with ?prefix=chatstream:"
)


def store_from_url(url: str, data_dir: Path, *, max_session_bytes: int | None = None,
                   max_bytes: int | None = None) -> SessionStore:
    """The store ``url`` names; ``data_dir`` holds the default SQLite file.

    ``max_session_bytes`` bounds what one session holds (its index and all its conversations);
    ``max_bytes`` bounds the store: the SQLite file, the bytes counted in Redis (beside its own
    ``maxmemory``) or held in memory.

    Raises ValueError naming the accepted forms when the URL is not one of them.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path or parts.query:
            raise _bad(url, "memory:// takes nothing after it")
        from .memory_store import MemorySessionStore

        return MemorySessionStore(max_session_bytes=max_session_bytes, max_bytes=max_bytes)
    if scheme == "sqlite":
        if parts.netloc or parts.query:
            raise _bad(url, "use sqlite:// alone, or sqlite:/// followed by an absolute path")
        if not parts.path:
            path = data_dir / "sessions.db"
        elif parts.path.startswith("/") and parts.path != "/":
            path = Path("/" + parts.path.lstrip("/"))
        else:
            raise _bad(url, "the path must be absolute: sqlite:///absolute/path.db")
        from .sqlite_store import SQLiteSessionStore

        return SQLiteSessionStore(path, max_bytes=max_bytes, max_session_bytes=max_session_bytes)
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise _bad(url, "a host is required: redis://host:port/db")
        query = parse_qs(parts.query, keep_blank_values=True)
        prefix = query.pop("prefix", ["chatstream:"])[-1]
        from .redis_store import RedisSessionStore

        try:
            client_url = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
            return RedisSessionStore.from_url(client_url, prefix=prefix, max_session_bytes=max_session_bytes,
                                             max_bytes=max_bytes)
        except (ValueError, TypeError) as exc:
            raise _bad(url, str(exc)) from None
    raise _bad(url, "unknown scheme")


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"bad session store URL {_redacted(url)!r} ({why}); accepted forms: {ACCEPTED_FORMS}")


def _redacted(url: str) -> str:
    """The URL without its password, fit for an error message or a log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable>"
