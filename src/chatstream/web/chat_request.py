"""The ``/chat_stream`` request body: parsed strictly, bounded, mapped to :class:`SamplingParams`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine import SamplingParams
from ..errors import InputTooLarge, InvalidRequest
from ..service.conversations import check_id
from ..service.sampling import SamplingLimits, to_sampling_params
from ..service.structured import response_format_values
from .json_body import BadJSON, parse_json_body

if TYPE_CHECKING:
    from ..service import ChatService

# Optional generation overrides, under their OpenAI names -> the engine's names.
_OVERRIDES = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "seed": "seed", "stop": "stop", "repetition_penalty": "repetition_penalty", "min_p": "min_p",
              "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
_WIRE_NAMES = {engine: wire for wire, engine in _OVERRIDES.items()}
_FIELDS = {"user_input", "regenerate", "conversation_id", "edit_index", "response_format"} | set(_OVERRIDES)


def parse_json_object(body: bytes, fields: Collection[str]) -> dict[str, Any]:
    """A strict JSON object whose keys are all in ``fields``; :class:`InvalidRequest` otherwise."""
    try:
        data = parse_json_body(body)
    except BadJSON as exc:
        raise InvalidRequest(str(exc)) from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)[:200]}; known: {', '.join(sorted(fields))}",
                             param=unknown[0])
    return data


def _asks_for_grammar(response_format: Any) -> bool:
    """Whether ``response_format`` (valid or not) makes a grammar: anything but none or ``text``."""
    return response_format is not None and not (isinstance(response_format, dict)
                                                and response_format.get("type") == "text" and len(response_format) == 1)


@dataclass(frozen=True)
class ChatStreamRequest:
    user_input: str
    regenerate: bool
    overrides: dict[str, Any]
    conversation_id: str | None = None  # one of the session's conversations; None: the current one
    edit_index: int | None = None  # the user message that user_input replaces (later messages are dropped)

    @classmethod
    async def read(cls, body: bytes, service: ChatService) -> ChatStreamRequest:
        """:meth:`parse`, off the event loop when the body asks for a ``response_format`` grammar:
        llguidance takes up to ~60 ms for a large schema, during which every other user would wait."""
        data = parse_json_object(body, _FIELDS)
        if _asks_for_grammar(data.get("response_format")):
            return await service.run_bounded(cls.from_data, data, service.max_input_chars, lane="grammar")
        return cls.from_data(data, service.max_input_chars)

    @classmethod
    def parse(cls, body: bytes, max_input_chars: int) -> ChatStreamRequest:
        """Validate a request body; raises :class:`InvalidRequest` (nothing changes)."""
        return cls.from_data(parse_json_object(body, _FIELDS), max_input_chars)

    @classmethod
    def from_data(cls, data: dict[str, Any], max_input_chars: int) -> ChatStreamRequest:
        """Validate a parsed body (see :func:`parse_json_object`)."""
        regenerate = data.get("regenerate", False)
        if not isinstance(regenerate, bool):
            raise InvalidRequest("'regenerate' must be true or false", param="regenerate")
        user_input = data.get("user_input")
        if regenerate:
            if user_input is not None and not isinstance(user_input, str):
                raise InvalidRequest("'user_input' must be a string", param="user_input")
            user_input = user_input or ""
        else:
            if user_input is None:
                raise InvalidRequest("'user_input' is required", param="user_input")
            if not isinstance(user_input, str):
                raise InvalidRequest("'user_input' must be a string", param="user_input")
            if not user_input.strip():
                raise InvalidRequest("'user_input' must not be empty", param="user_input")
        if len(user_input) > max_input_chars:
            raise InputTooLarge(f"the message is {len(user_input):,} characters; this server takes at most "
                                f"{max_input_chars:,}", param="user_input")
        stop = data.get("stop")
        if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
        overrides = {_OVERRIDES[k]: v for k, v in data.items() if k in _OVERRIDES and v is not None}
        overrides.update(response_format_values(data.get("response_format")))  # OpenAI's shape; JSON replies
        conversation_id = data.get("conversation_id")
        if conversation_id is not None:
            conversation_id = check_id(conversation_id)
        edit_index = data.get("edit_index")
        if edit_index is not None:
            if not isinstance(edit_index, int) or isinstance(edit_index, bool) or not 0 <= edit_index < 1 << 31:
                raise InvalidRequest("'edit_index' must be the index of a user message (an integer from 0)",
                                     param="edit_index")
            if regenerate:
                raise InvalidRequest("'edit_index' and 'regenerate' cannot be combined", param="edit_index")
        return cls(user_input=user_input, regenerate=regenerate, overrides=overrides,
                   conversation_id=conversation_id, edit_index=edit_index)

    def to_sampling_params(self, defaults: SamplingParams, limits: SamplingLimits,
                           conversation: dict[str, Any] | None = None) -> SamplingParams:
        """``defaults``, then the conversation's own settings, then this request's overrides."""
        return to_sampling_params(defaults, limits, {**(conversation or {}), **self.overrides}, _WIRE_NAMES)
