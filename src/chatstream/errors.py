"""Domain errors: why a chat turn was refused or ended, in words every face can encode.

The service raises these; each face (``/chat_stream``, ``/v1``, the console) only translates
them into its own envelope (an HTTP status and JSON shape, a terminal line). Nothing here knows
HTTP: the status a face picks for each ``code`` lives in the face.
"""

from __future__ import annotations


class ChatError(Exception):
    """A turn was refused before anything streamed. ``code`` is stable; ``message`` is for people."""

    code = "chat_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ChatError):
    """Bad input: nothing changes. ``param`` names the offending field when there is one."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidParams(InvalidRequest):
    """A sampling parameter out of its documented range."""


class InputTooLarge(InvalidRequest):
    """The input is over a size limit (characters, messages, bytes)."""

    code = "input_too_large"


class NothingToRegenerate(ChatError):
    code = "nothing_to_regenerate"


class ConversationTooLong(ChatError):
    """The stored conversation reached its message limit: clear it (or start another) to go on."""

    code = "conversation_too_long"


class PromptTooLong(ChatError):
    """Even the newest user turn alone does not fit the context."""

    code = "input_too_large"

    def __init__(self, message: str, prompt_tokens: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit

    def in_context(self, context_len: int, reply_tokens: int) -> PromptTooLong:
        """The same refusal in the user's terms: the message's tokens against the model's context."""
        if self.prompt_tokens is None:
            return self
        return PromptTooLong(
            f"the message is too long: it takes {self.prompt_tokens:,} tokens, and the model's context of "
            f"{context_len:,} tokens leaves {max(context_len - reply_tokens, 0):,} for it after the {reply_tokens:,} "
            "kept for the reply; shorten it",
            prompt_tokens=self.prompt_tokens, limit=context_len - reply_tokens,
        )


class SessionBusy(ChatError):
    """Another turn of the same conversation is running (possibly in another process);
    ``conversation_id`` names it when the lock was a conversation's."""

    code = "session_busy"

    def __init__(self, message: str, conversation_id: str | None = None) -> None:
        super().__init__(message)
        self.conversation_id = conversation_id


class QueueFull(ChatError):
    """Every slot is busy and the wait queue is full."""

    code = "too_many_requests"

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: all generation slots and the wait queue are full; retry later")
        self.retry_after = retry_after


class ModelNotReady(ChatError):
    """The model is loading (``retry_after`` set), failed to load, or the server is shutting down."""

    def __init__(self, message: str, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class StoreUnavailable(ChatError):
    """The session store cannot be reached or failed (Redis down, a damaged database): retry shortly."""

    code = "store_unavailable"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreFull(ChatError):
    """The session store is out of space (its byte quota, or the disk): deleting conversations frees it."""

    code = "store_full"


class SessionTooLarge(ChatError):
    """This session holds the most bytes a session may: delete a conversation (or clear it) to go on."""

    code = "session_too_large"


class LeaseLost(ChatError):
    """A write came from a holder whose lock lease ran out (it stalled): the store refused it.

    This is the fence that keeps a stalled process from overwriting what others changed meanwhile.
    """

    code = "lease_lost"
