"""Parsing and validating the ``/chat_stream`` request body."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from ..engine.sampling_params import InvalidSamplingParams, SamplingParams


class BadRequest(Exception):
    """Bad input: answered with ``status`` and ``{"error": code, "message": ...}``; nothing changes."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


# Optional generation overrides, under their OpenAI names.
_OVERRIDES = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty"}
_FIELDS = {"user_input", "regenerate"} | _OVERRIDES


@dataclass(frozen=True)
class ChatStreamRequest:
    user_input: str
    regenerate: bool
    overrides: dict[str, Any]

    def sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        values = {"max_new_tokens" if k == "max_tokens" else k: v for k, v in self.overrides.items()}
        try:
            params = replace(defaults, **values)  # validated again by SamplingParams
        except InvalidSamplingParams as exc:
            name = "max_tokens" if exc.param == "max_new_tokens" else exc.param
            raise BadRequest(f"'{name}' {str(exc).split(' ', 1)[1]}") from None
        if params.max_new_tokens > defaults.max_new_tokens:
            raise BadRequest(f"'max_tokens' must be at most {defaults.max_new_tokens} on this server")
        return params


def parse_chat_stream_request(body: bytes, max_input_chars: int) -> ChatStreamRequest:
    if not body.strip():
        raise BadRequest("the request body is empty: send JSON like {\"user_input\": \"Hello\"}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    regenerate = data.get("regenerate", False)
    if not isinstance(regenerate, bool):
        raise BadRequest("'regenerate' must be true or false")
    user_input = data.get("user_input")
    if regenerate:
        if user_input is not None and not isinstance(user_input, str):
            raise BadRequest("'user_input' must be a string")
        user_input = user_input or ""
    else:
        if user_input is None:
            raise BadRequest("'user_input' is required")
        if not isinstance(user_input, str):
            raise BadRequest("'user_input' must be a string")
        if not user_input.strip():
            raise BadRequest("'user_input' must not be empty")
    if len(user_input) > max_input_chars:
        raise BadRequest(
            f"'user_input' is {len(user_input)} characters; the limit is {max_input_chars}",
            code="input_too_large", status=413,
        )
    overrides = {k: data[k] for k in _OVERRIDES if k in data}
    if "stop" in overrides and not isinstance(overrides["stop"], (str, list)):
        raise BadRequest("'stop' must be a string or a list of strings")
    return ChatStreamRequest(user_input=user_input, regenerate=regenerate, overrides=overrides)
