"""Several conversations per session: a small index, and each conversation stored on its own.

The session's own key holds the index (everything JSON, never pickled)::

    {"conversations": {"<id>": {"title": str, "created": float, "updated": float, "message_count": int,
                                "settings": {"system_prompt"?, "temperature"?, "top_p"?, "max_tokens"?,
                                             "top_k"?, "seed"?, "stop"?}}},
     "current": "<id>" | None,
     "defaults": {settings as above}}   # the user's defaults for all chats (a chat's own settings win)

and each conversation's messages live under ``<session id>/<conversation id>`` as
``{"system", "messages", "context_start"?}`` with their own lock, so a turn reads and writes one
conversation (never the whole session) and a user's conversations can stream in parallel.

Older layouts are read as they are and split on the next change (:func:`split_legacy`): until
this release each index entry held its conversation as ``"chat_prompt"``; before there were
several conversations the session held one ``"chat_prompt"`` at the top level, which
:func:`migrate` turns into the conversation ``"default"`` (a fixed id, so that reads which do not
save agree on it). The functions here only edit such a dict; loading, locking and saving stay
with :class:`~chatstream.service.ChatService` and the faces.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from ..engine import SamplingParams
from ..errors import ChatError, InvalidRequest
from .sampling import SamplingLimits, to_sampling_params

LEGACY_KEY = "chat_prompt"
CONVERSATIONS_KEY = "conversations"
CURRENT_KEY = "current"
LEGACY_ID = "default"

MAX_CONVERSATIONS = 100
MAX_TITLE_CHARS = 200
_TITLE_FROM_MESSAGE_CHARS = 40
AUTO_TITLE_KEY = "title_auto"  # the title was derived from the first message (and follows its edits)
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULTS_KEY = "defaults"
SETTING_NAMES = ("system_prompt", "temperature", "top_p", "max_tokens", "top_k", "seed", "stop")
MAX_TEMPERATURE = 2.0  # what the server's own settings allow
MAX_STOP_STRINGS = 4  # as the OpenAI API allows
MAX_STOP_CHARS = 100

Data = dict[str, Any]


class ConversationNotFound(ChatError):
    """No conversation with this id in this session (another user's id looks exactly the same)."""

    code = "conversation_not_found"


class TooManyConversations(ChatError):
    """The session holds the most conversations it may: delete one first."""

    code = "too_many_conversations"


# -- layout --

def migrate(data: Data) -> dict[str, Data]:
    """Bring ``data`` to the layout above, in place; returns its conversations."""
    conversations = data.get(CONVERSATIONS_KEY)
    if not isinstance(conversations, dict):
        conversations = {}
    # Keep only well-formed entries: a damaged record must not break every read.
    conversations = {k: v for k, v in conversations.items() if isinstance(k, str) and _ID.match(k) and isinstance(v, dict)}
    data[CONVERSATIONS_KEY] = conversations
    legacy = data.pop(LEGACY_KEY, None)
    if isinstance(legacy, dict) and LEGACY_ID not in conversations:
        conversations[LEGACY_ID] = {"title": _title_from(legacy) or "Conversation", "created": 0.0, "updated": 0.0,
                                    "settings": {}, "chat_prompt": legacy}
        data[CURRENT_KEY] = LEGACY_ID
    if data.get(CURRENT_KEY) not in conversations:
        newest = ordered(data)
        data[CURRENT_KEY] = newest[0][0] if newest else None
    return conversations


def ordered(data: Data) -> list[tuple[str, Data]]:
    """The conversations, newest (last updated) first."""
    conversations = data.get(CONVERSATIONS_KEY) or {}
    return sorted(conversations.items(), key=lambda item: (-_number(item[1].get("updated")), item[0]))


def summary(conversation_id: str, entry: Data) -> Data:
    """What a list shows of one conversation."""
    count = entry.get("message_count")
    if not isinstance(count, int) or isinstance(count, bool):
        legacy = entry.get(LEGACY_KEY)
        messages = legacy.get("messages") if isinstance(legacy, dict) else None
        count = len(messages) if isinstance(messages, list) else 0
    return {
        "id": conversation_id,
        "title": entry.get("title") if isinstance(entry.get("title"), str) else "",
        "created": _number(entry.get("created")),
        "updated": _number(entry.get("updated")),
        "message_count": count,
        "settings": dict(entry.get("settings") or {}),
    }


def split_legacy(data: Data) -> dict[str, Data]:
    """Take the conversations an older layout kept inside the index out of it; returns them by id
    (the caller stores each on its own before saving the index)."""
    split: dict[str, Data] = {}
    for conversation_id, entry in migrate(data).items():
        legacy = entry.pop(LEGACY_KEY, None)
        if isinstance(legacy, dict):
            split[conversation_id] = legacy
            messages = legacy.get("messages")
            entry["message_count"] = len(messages) if isinstance(messages, list) else 0
    return split


def legacy_chat_prompt(entry: Data) -> Data | None:
    """The conversation an older layout kept inside its index entry, if it is one of those."""
    legacy = entry.get(LEGACY_KEY)
    return legacy if isinstance(legacy, dict) else None


# -- lookups --

def check_id(conversation_id: Any) -> str:
    if not isinstance(conversation_id, str) or not _ID.match(conversation_id):
        raise InvalidRequest("'conversation_id' must be 1 to 64 letters, digits, '-' or '_'", param="conversation_id")
    return conversation_id


def get(data: Data, conversation_id: str) -> Data:
    entry = (data.get(CONVERSATIONS_KEY) or {}).get(check_id(conversation_id))
    if not isinstance(entry, dict):
        raise ConversationNotFound(f"there is no conversation {conversation_id!r} in this session")
    return entry


def resolve(data: Data, conversation_id: str | None, *, create: bool) -> str | None:
    """The id a request means: the one given (which must exist), else the current one.

    With ``create``, a session without any conversation gets a new one (in ``data`` only).
    """
    if conversation_id is not None:
        get(data, conversation_id)
        return conversation_id
    current = data.get(CURRENT_KEY)
    if isinstance(current, str) and current in (data.get(CONVERSATIONS_KEY) or {}):
        return current
    return create_conversation(data) if create else None


# -- changes (in memory; the caller saves) --

def check_room(data: Data) -> None:
    """Raise :class:`TooManyConversations` if the session cannot hold another conversation."""
    if len(migrate(data)) >= MAX_CONVERSATIONS:
        raise TooManyConversations(
            f"this session already holds {MAX_CONVERSATIONS} conversations: delete one to start another"
        )


def new_id() -> str:
    return uuid.uuid4().hex


def create_conversation(data: Data, title: str = "", settings: Mapping[str, Any] | None = None,
                        conversation_id: str | None = None) -> str:
    check_room(data)
    conversations = migrate(data)
    conversation_id = conversation_id or new_id()
    now = time.time()
    conversations[conversation_id] = {"title": title, "created": now, "updated": now, "message_count": 0,
                                      "settings": dict(settings or {})}
    data[CURRENT_KEY] = conversation_id
    return conversation_id


def delete(data: Data, conversation_id: str) -> None:
    get(data, conversation_id)
    del data[CONVERSATIONS_KEY][conversation_id]
    if data.get(CURRENT_KEY) == conversation_id:
        newest = ordered(data)
        data[CURRENT_KEY] = newest[0][0] if newest else None


def note_chat_prompt(data: Data, conversation_id: str, chat_prompt: Data, current_was: Any = ...) -> None:
    """Record in the index that a conversation's messages changed; the first user message names an untitled one.

    A conversation a turn started (there was none) enters the index here, with its first messages.
    It becomes the current one unless the current one changed since ``current_was`` (what it was
    when the turn began): a chat the user opened meanwhile ("New chat") stays current.
    """
    current_now = data.get(CURRENT_KEY)
    if conversation_id not in migrate(data):
        create_conversation(data, conversation_id=conversation_id)
    entry = get(data, conversation_id)
    messages = chat_prompt.get("messages")
    entry["message_count"] = len(messages) if isinstance(messages, list) else 0
    entry["updated"] = time.time()
    if not entry.get("title") or entry.get(AUTO_TITLE_KEY):  # a title the user gave is never replaced
        entry["title"] = _title_from(chat_prompt)
        entry[AUTO_TITLE_KEY] = True
    # The conversation in use is the one a reload shows.
    data[CURRENT_KEY] = conversation_id if current_was is ... or current_now == current_was else current_now


# -- validation of what clients send --

def parse_title(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("'title' must be a string", param="title")
    title = " ".join(value.split())
    if not title:
        raise InvalidRequest("'title' must not be empty", param="title")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidRequest(f"'title' is {len(title)} characters; the limit is {MAX_TITLE_CHARS}", param="title")
    return title


def parse_settings(value: Any, defaults: SamplingParams, limits: SamplingLimits, max_system_chars: int,
                   current: Mapping[str, Any] | None = None) -> Data:
    """``current`` settings with ``value`` applied (``null`` removes a setting); raises InvalidRequest."""
    if not isinstance(value, dict):
        raise InvalidRequest("'settings' must be an object", param="settings")
    unknown = sorted(set(value) - set(SETTING_NAMES))
    if unknown:
        raise InvalidRequest(f"unknown setting(s): {', '.join(unknown)[:200]}; known: {', '.join(SETTING_NAMES)}",
                             param=f"settings.{unknown[0]}")
    result = dict(current or {})
    for name, setting in value.items():
        if setting is None:
            result.pop(name, None)
        else:
            result[name] = setting
    system = result.get("system_prompt")
    if system is not None:
        if not isinstance(system, str):
            raise InvalidRequest("'settings.system_prompt' must be a string or null", param="settings.system_prompt")
        if len(system) > max_system_chars:
            raise InvalidRequest(f"'settings.system_prompt' is {len(system)} characters; the limit is {max_system_chars}",
                                 param="settings.system_prompt")
    temperature = result.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > MAX_TEMPERATURE:
        raise InvalidRequest(f"'settings.temperature' must be at most {MAX_TEMPERATURE:g}", param="settings.temperature")
    # Stored settings are refused above the server's limit, not clamped: the user would not see the change.
    max_tokens = result.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_new_tokens:
        raise InvalidRequest(f"'settings.max_tokens' must be at most {limits.max_new_tokens} (this server's limit)",
                             param="settings.max_tokens")
    stop = result.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
            raise InvalidRequest(f"'settings.stop' must be a list of at most {MAX_STOP_STRINGS} non-empty strings "
                                 f"of at most {MAX_STOP_CHARS} characters", param="settings.stop")
        result["stop"] = stop
    # The same checks as a request's own overrides.
    to_sampling_params(defaults, limits, sampling_values(result),
                       {"max_new_tokens": "settings.max_tokens", "temperature": "settings.temperature",
                        "top_p": "settings.top_p", "top_k": "settings.top_k", "seed": "settings.seed",
                        "stop": "settings.stop"})
    return result


def sampling_values(settings: Mapping[str, Any]) -> Data:
    """A conversation's settings under the engine's names (what ``to_sampling_params`` takes)."""
    names = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens", "top_k": "top_k",
             "seed": "seed", "stop": "stop"}
    return {names[k]: tuple(v) if k == "stop" else v for k, v in settings.items() if k in names}


def session_defaults(data: Data) -> Data:
    """The user's settings for all chats (empty if none or damaged)."""
    defaults = data.get(DEFAULTS_KEY)
    return dict(defaults) if isinstance(defaults, dict) else {}


def effective_settings(data: Data, entry: Data | None) -> Data:
    """What applies to a conversation: the user's defaults, then the conversation's own settings."""
    own = (entry or {}).get("settings")
    return {**session_defaults(data), **(own if isinstance(own, dict) else {})}


def _title_from(chat_prompt: Data) -> str:
    """The first line of the first user message, cut at a word boundary to about 40 characters."""
    for message in chat_prompt.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
            lines = [" ".join(line.split()) for line in message["content"].splitlines()]
            text = next((line for line in lines if line), "")
            if len(text) > _TITLE_FROM_MESSAGE_CHARS:
                cut = text.rfind(" ", 0, _TITLE_FROM_MESSAGE_CHARS)
                text = text[: cut if cut >= _TITLE_FROM_MESSAGE_CHARS // 2 else _TITLE_FROM_MESSAGE_CHARS - 1]
                text = text.rstrip(" ,;:-") + "…"
            return text
    return ""


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0.0
