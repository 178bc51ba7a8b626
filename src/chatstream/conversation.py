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
# Earlier versions a user message keeps when it is edited, each with the messages that followed it.
MAX_BRANCHES = 10


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
            every, details = versions(replaced), version_details(replaced)
            if text in every:  # the same answer again (or nothing new): no copy, that answer is used
                _set_version(message, every, details, every.index(text))
            else:
                every, details = every[-MAX_ALTERNATIVES:] + [text], details[-MAX_ALTERNATIVES:] + [None]
                _set_version(message, every, details, len(every) - 1)
        return message

    def set_last_reply_details(self, details: dict[str, Any]) -> None:
        """Attach how the last reply ended (finish reason, token count, speed) to the answer it holds."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            checked = _check_details(details)
            if checked is not None:
                self.messages[-1]["details"] = checked

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
        """Make answer ``version`` (see :func:`versions`) of the reply at ``index`` the one the conversation goes on from.

        At a user message that was edited, ``version`` picks one of its versions (see :func:`branches`)
        and the conversation goes on with the messages that followed that version.
        """
        if 0 <= index < len(self.messages) and self.messages[index]["role"] == "user":
            tails = branches(self.messages[index:])
            if not 0 <= version < len(tails):
                raise IndexError(f"message {index} has {len(tails)} version(s); there is no version {version}")
            self._set_branch(index, tails, version)
            return
        if not (0 <= index < len(self.messages)) or self.messages[index]["role"] != "assistant":
            raise IndexError(f"message {index} is not a reply of this conversation")
        message = self.messages[index]
        every = versions(message)
        if not 0 <= version < len(every):
            raise IndexError(f"reply {index} has {len(every)} answer(s); there is no answer {version}")
        _set_version(message, every, version_details(message), version)

    def edit_user_message(self, index: int, text: str) -> None:
        """Replace the user message at ``index`` and what followed it with a new version (the conversation branches).

        The version replaced, with the messages after it, is kept: :meth:`select_version` goes back to it.
        """
        if not (0 <= index < len(self.messages)) or self.messages[index]["role"] != "user":
            raise IndexError(f"message {index} is not a user message of this conversation")
        every = branches(self.messages[index:])[-(MAX_BRANCHES - 1):] + [[{"role": "user", "content": text}]]
        self._set_branch(index, every, len(every) - 1)

    def _set_branch(self, index: int, every: list[list[dict[str, Any]]], version: int) -> None:
        """Messages from ``index`` on become ``every[version]``; its first message keeps the other versions."""
        head = dict(every[version][0])
        others = every[:version] + every[version + 1:]
        if others:
            head["branches"] = others
            if version < len(others):
                head["branch"] = version
        self.messages[index:] = [head, *every[version][1:]]
        self.context_start = 0

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

    def head_ids(self) -> list[int]:
        """The token ids every prompt of this conversation starts with, whatever its user writes: the
        chat template's head and the system message (the common start of two renderings that differ
        only in the user's message)."""
        one, two = (self._encode(self.render(self._with_system([{"role": "user", "content": text}])))
                    for text in ("a", "b"))
        same = next((i for i, (x, y) in enumerate(zip(one, two)) if x != y), min(len(one), len(two)))
        return one[:same]

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
        head, messages = self.to_rows()
        return {**head, "messages": messages}

    def to_rows(self, start: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """:meth:`to_dict` as a store keeps it: the head (everything but the messages) and copies of
        the messages from ``start`` on (what a save that changed only those writes)."""
        data = self.to_dict_head()
        return data, [_copy_message(m) for m in self.messages[start:]]

    def to_dict_head(self) -> dict[str, Any]:
        head: dict[str, Any] = {"system": self.system}
        if self.context_start:
            head["context_start"] = self.context_start
        return head

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


def branches(tail: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Every version of the user message ``tail[0]``, oldest first, each with the messages that followed it
    (``tail`` itself, without the versions it keeps, at ``branch``; default: last)."""
    head = tail[0]
    others = [b for b in head.get("branches") or [] if isinstance(b, list) and b]
    current = [{k: v for k, v in head.items() if k not in ("branches", "branch")}, *tail[1:]]
    version = head.get("branch", len(others))
    return others[:version] + [current] + others[version:]


def version_details(message: dict[str, Any]) -> list[dict[str, Any] | None]:
    """How each answer of :func:`versions` ended (``details``), in the same order; None where not known."""
    alternatives = list(message.get("alternatives") or [])
    stored = message.get("alternative_details")
    others = [_check_details(d) for d in stored] if isinstance(stored, list) else []
    others = (others + [None] * len(alternatives))[: len(alternatives)]
    version = message.get("version", len(alternatives))
    return others[:version] + [_check_details(message.get("details"))] + others[version:]


def _set_version(message: dict[str, Any], answers: list[str], details: list[dict[str, Any] | None],
                 version: int) -> None:
    """Make ``answers[version]`` the reply's content; the other answers (and their details) its alternatives."""
    for key in ("alternatives", "alternative_details", "version", "details"):
        message.pop(key, None)
    message["content"] = answers[version]
    if details[version] is not None:
        message["details"] = details[version]
    others = answers[:version] + answers[version + 1:]
    if not others:
        return
    message["alternatives"] = others
    other_details = details[:version] + details[version + 1:]
    if any(d is not None for d in other_details):
        message["alternative_details"] = other_details
    if version < len(others):
        message["version"] = version


# What a reply's ``details`` may hold: how it ended, and the figures the UI shows under it.
_FINISH_REASONS = ("stop", "length", "stopped", "error", "streaming")
_DETAIL_NUMBERS = ("completion_tokens", "tokens_per_s", "ttft_s", "queue_s")


def _check_details(details: Any) -> dict[str, Any] | None:
    """Only a known finish reason and finite numbers: stored data is never trusted blindly."""
    if not isinstance(details, dict) or details.get("finish_reason") not in _FINISH_REASONS:
        return None
    checked: dict[str, Any] = {"finish_reason": details["finish_reason"]}
    for name in _DETAIL_NUMBERS:
        value = details.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12:
            checked[name] = value
    return checked


def _copy_message(message: dict[str, Any]) -> dict[str, Any]:
    """Role and content, plus the other answers of a regenerated reply (and which one is used) if any,
    and how each answer ended (``details``, ``alternative_details``)."""
    copy: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    details = _check_details(message.get("details"))
    if details is not None:
        copy["details"] = details
    alternatives = message.get("alternatives")
    if isinstance(alternatives, list) and alternatives and all(isinstance(a, str) for a in alternatives):
        kept = len(alternatives[-MAX_ALTERNATIVES:])
        copy["alternatives"] = alternatives[-kept:]
        stored = message.get("alternative_details")
        if isinstance(stored, list) and len(stored) == len(alternatives):
            others = [_check_details(d) for d in stored[-kept:]]
            if any(d is not None for d in others):
                copy["alternative_details"] = others
        version = message.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and 0 <= version < len(copy["alternatives"]):
            copy["version"] = version  # the answer in use sits here among the others (absent: after them)
    stored_branches = message.get("branches")
    if message["role"] == "user" and isinstance(stored_branches, list):
        kept_branches = [
            [_copy_message(m) for m in branch if _is_message(m)]
            for branch in stored_branches[-(MAX_BRANCHES - 1):]
            if isinstance(branch, list) and branch and _is_message(branch[0]) and branch[0]["role"] == "user"
        ]
        if kept_branches:
            copy["branches"] = kept_branches
            branch_index = message.get("branch")
            if isinstance(branch_index, int) and not isinstance(branch_index, bool) and 0 <= branch_index < len(kept_branches):
                copy["branch"] = branch_index  # this version sits here among the others (absent: after them)
    return copy


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)


def _group_turns(messages: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Group messages into turns that start at each user message."""
    turns: list[list[dict[str, str]]] = []
    for m in messages:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns
