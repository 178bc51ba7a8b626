"""Browser chat UI served at ``/``: plain HTML, CSS and JavaScript shipped inside the package.

There is no build step: the files under ``chatstream/static/`` are served as they are. The page
talks to the same routes as any other client (``/chat_stream``, ``/history``, ``/clear_context``,
``/health``) with relative URLs, so it also works when the app is mounted under a prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Model output is rendered with DOM text nodes only; this policy is a second line of defence:
# no inline script, no third-party origins, no plugins, no framing.
_CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS = {
    "Content-Security-Policy": _CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class _RevalidatedStaticFiles(StaticFiles):
    """Static files that the browser revalidates (ETag) on every load, so upgrades show at once."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


async def _index(request: Request) -> Response:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Cache-Control": "no-cache", **SECURITY_HEADERS},
    )


def add_ui_routes(app: Any) -> None:
    """Serve the chat page at ``/`` and its assets under ``/static/``."""
    app.add_route("/", _index, methods=["GET"], include_in_schema=False)
    app.mount("/static", _RevalidatedStaticFiles(directory=STATIC_DIR), name="static")
