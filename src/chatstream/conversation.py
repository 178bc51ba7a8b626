"""The conversation of one session: turns, regenerate, rendering to a prompt that fits the context."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from .errors import PromptTooLong

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

PromptTooLongError = PromptTooLong  # the name this module exported before the domain errors

# Tokens a chat template adds around one message (role markers, separators), for estimates.
_MESSAGE_OVERHEAD_TOKENS = 8
# Earlier answers a reply keeps when it is regenerated (oldest dropped first).
MAX_ALTERNATIVES = 10


class ChatPrompt:
    """History of one conversation, as plain ``{"role", "content"}`` turns.

    Rendering uses the tokenizer's own chat template. To use another prompt format, subclass and
    override :meth:`render` (pass the class as ``ChatStream(chat_prompt_clazz=...)``).
    Only plain data is persisted (:meth:`to_dict`), never the object itself.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        system: str | None = None,
        messages: Iterable[dict[str, str]] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.system = system
        self.messages: list[dict[str, Any]] = [_copy_message(m) for m in messages]
        # The reply taken away by clear_last_responder_message: the next reply keeps it as an alternative.
        self._replaced: dict[str, Any] | None = None
        # Index of the first turn the model still sees. It only moves forward, in large steps, so
        # the prompt's beginning stays the same for many turns and the engine's prefix cache hits.
        self.context_start = 0

    # -- the original ChatStream vocabulary --
    def add_requester_msg(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_responder_msg(self, text: str) -> None:
        self.messages.append(self.reply_message(text))
        self._replaced = None

    def reply_message(self, text: str) -> dict[str, Any]:
        """The message :meth:`add_responder_msg` would append for ``text``, changing nothing.

        After :meth:`clear_last_responder_message` it carries the earlier answers of the reply
        being regenerated, so a checkpoint of a reply in progress keeps every answer the user had.
        """
        message: dict[str, Any] = {"role": "assistant", "content": text}
        replaced = self._replaced
        if replaced is not None:
            every = versions(replaced)
            if text in every:  # the same answer again (or nothing new): no copy, that answer is used
                version = every.index(text)
                message["alternatives"] = every[:version] + every[version + 1:]
                if version < len(message["alternatives"]):
                    message["version"] = version
                if not message["alternatives"]:
                    del message["alternatives"]
            else:
                message["alternatives"] = every[-MAX_ALTERNATIVES:]
        return message

    def set_responder_last_msg(self, text: str) -> None:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages[-1]["content"] = text
        else:
            self.add_responder_msg(text)

    def get_requester_last_msg(self) -> str | None:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), None)

    def get_responder_last_msg(self) -> str | None:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), None)

    def clear_last_responder_message(self) -> bool:
        """Drop the last reply so the last user turn can be answered again. False if there is none."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self._replaced = self.messages.pop()
            return True
        return False

    def select_version(self, index: int, version: int) -> None:
        """Make answer ``version`` (see :func:`versions`) of the reply at ``index`` the one the conversation goes on from."""
        if not (0 <= index < len(self.messages)) or self.messages[index]["role"] != "assistant":
            raise IndexError(f"message {index} is not a reply of this conversation")
        message = self.messages[index]
        every = versions(message)
        if not 0 <= version < len(every):
            raise IndexError(f"reply {index} has {len(every)} answer(s); there is no answer {version}")
        message["content"] = every[version]
        message["alternatives"] = every[:version] + every[version + 1:]
        message["version"] = version
        if not message["alternatives"]:
            del message["alternatives"], message["version"]

    def edit_user_message(self, index: int, text: str) -> None:
        """Replace the user message at ``index`` and drop everything after it (the conversation branches).

        What it replaces is kept, not lost: the new message's ``branches`` lists the earlier
        branches from this point (each the messages it held, the edited one first; the newest
        ``MAX_ALTERNATIVES``), so every save of the new branch, checkpoints included, stores them too.
        """
        if not (0 <= index < len(self.messages)) or self.messages[index]["role"] != "user":
            raise IndexError(f"message {index} is not a user message of this conversation")
        replaced = self.messages[index:]
        earlier = replaced[0].get("branches")
        branch = [{k: v for k, v in m.items() if k != "branches"} if i == 0 else m for i, m in enumerate(replaced)]
        branches = (list(earlier) if isinstance(earlier, list) else []) + [branch]
        del self.messages[index:]
        self.context_start = 0
        self.add_requester_msg(text)
        self.messages[-1]["branches"] = branches[-MAX_ALTERNATIVES:]

    def clear(self) -> None:
        self.messages.clear()
        self.context_start = 0

    def is_empty(self) -> bool:
        return not self.messages

    def create_prompt(self) -> str:
        """The whole conversation rendered as the model sees it (with no generation prompt)."""
        return self.render(self._with_system(self.messages), add_generation_prompt=False)

    # -- rendering --
    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Turn messages into prompt text. Override for a custom prompt format."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: pass chat_prompt_clazz= to ChatStream")
        return self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def render_ids(self, max_prompt_tokens: int) -> list[int]:
        """Token ids of the prompt for the next reply, dropping the oldest whole turns to fit.

        The system message and the newest user turn are always kept, and a turn is never cut.
        The cost is bounded by what fits the context, not by the length of the stored history:
        turn sizes are estimated from the newest backwards, and only the kept part is rendered.
        When the kept part overflows, old turns are dropped until it fills about half of the
        budget, so the next turns reuse the same prompt start (and the engine's cached prefix).
        """
        turns = _group_turns(self.messages)
        if not turns:
            return self._encode(self.render(self._with_system([])))
        last = len(turns) - 1
        fits_from = self._earliest_start(turns, max_prompt_tokens)
        start = min(self.context_start, last)
        if start < fits_from:
            start = max(fits_from, self._earliest_start(turns, max_prompt_tokens // 2))
        while True:
            ids = self._encode(self.render(self._with_system([m for t in turns[start:] for m in t])))
            if len(ids) <= max_prompt_tokens:
                self.context_start = start
                return ids
            if start >= last:
                raise PromptTooLong(
                    f"the message is too long for the model's context ({max_prompt_tokens} prompt tokens allowed)",
                    prompt_tokens=len(ids), limit=max_prompt_tokens,
                )
            start += 1  # the estimate was short: drop one more turn

    def kept_messages(self) -> list[dict[str, str]]:
        """The messages the last :meth:`render_ids` kept: the system message and the turns from ``context_start``."""
        turns = _group_turns(self.messages)
        start = min(self.context_start, max(len(turns) - 1, 0))
        return self._with_system([dict(m) for t in turns[start:] for m in t])

    def _earliest_start(self, turns: Sequence[Sequence[dict[str, str]]], budget: int) -> int:
        """The first turn from which the estimated size of the rest stays within ``budget``."""
        used = self._estimate(self._with_system([]))
        for index in range(len(turns) - 1, -1, -1):
            used += self._estimate(turns[index])
            if used > budget:
                return min(index + 1, len(turns) - 1)
        return 0

    def _estimate(self, messages: Sequence[dict[str, str]]) -> int:
        return sum(len(self._encode(m["content"])) + _MESSAGE_OVERHEAD_TOKENS for m in messages)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _with_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        # Only role and content reach the chat template (alternatives are for people, not the model).
        return head + [{"role": m["role"], "content": m["content"]} for m in messages]

    # -- persistence (plain JSON data only) --
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"system": self.system, "messages": [_copy_message(m) for m in self.messages]}
        if self.context_start:
            data["context_start"] = self.context_start
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, tokenizer: Any = None, system: str | None = None) -> ChatPrompt:
        data = data or {}
        messages = [
            m for m in data.get("messages", [])
            if isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        ]
        stored_system = data.get("system", system)
        prompt = cls(tokenizer=tokenizer, system=stored_system if isinstance(stored_system, str) else None,
                     messages=messages)
        start = data.get("context_start", 0)
        prompt.context_start = start if isinstance(start, int) and not isinstance(start, bool) and start > 0 else 0
        return prompt

    def __repr__(self) -> str:
        return f"{type(self).__name__}(system={self.system!r}, turns={len(self.messages)})"


def versions(message: dict[str, Any]) -> list[str]:
    """Every answer of a reply, oldest first: ``alternatives`` with ``content`` at ``version`` (default: last)."""
    alternatives = list(message.get("alternatives") or [])
    version = message.get("version", len(alternatives))
    return alternatives[:version] + [message["content"]] + alternatives[version:]


def _copy_message(message: dict[str, Any]) -> dict[str, Any]:
    """The message whole (fields a UI adds, such as ``incomplete`` or ``stats``, are kept), with the
    other answers of a regenerated reply (and which one is used) checked."""
    if message["role"] != "assistant":  # e.g. a UI's edit branches on a user message: its own shape, kept
        return dict(message)
    copy: dict[str, Any] = {k: v for k, v in message.items() if k not in ("alternatives", "version")}
    alternatives = message.get("alternatives")
    if isinstance(alternatives, list) and alternatives and all(isinstance(a, str) for a in alternatives):
        copy["alternatives"] = alternatives[-MAX_ALTERNATIVES:]
        version = message.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and 0 <= version < len(copy["alternatives"]):
            copy["version"] = version  # the answer in use sits here among the others (absent: after them)
    return copy


def _group_turns(messages: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Group messages into turns that start at each user message."""
    turns: list[list[dict[str, str]]] = []
    for m in messages:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns
