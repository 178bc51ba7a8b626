"""JSON error answers for the HTTP guards, in the envelope of the route they stand in front of.

chatstream's own routes answer ``{"error": code, "message": ...}``; the OpenAI-compatible routes
under ``/v1`` answer OpenAI's ``{"error": {"message", "type", "param", "code"}}``, which the
official clients parse. A guard that refuses a request picks the envelope by path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Scope

OPENAI_PREFIX = "/v1"


def is_openai_path(scope: Scope) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):  # Starlette >= 0.35 keeps root_path inside path
        path = path[len(root):]
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_body(scope: Scope, code: str, message: str) -> dict[str, Any]:
    if is_openai_path(scope):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return {"error": code, "message": message}


def json_error(
    scope: Scope, status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(scope, code, message), status_code=status_code, headers=headers)
