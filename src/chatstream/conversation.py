"""The conversation of one session: turns, regenerate, rendering to a prompt that fits the context."""

from __future__ import annotations

from typing import Any, Iterable, Literal, Sequence

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class PromptTooLongError(ValueError):
    """Even the system message plus the newest user turn do not fit the context."""


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
        self.messages: list[dict[str, str]] = [
            {"role": m["role"], "content": m["content"]} for m in messages
        ]

    # -- the original ChatStream vocabulary --
    def add_requester_msg(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_responder_msg(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

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
            self.messages.pop()
            return True
        return False

    def clear(self) -> None:
        self.messages.clear()

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
        """
        turns = _group_turns(self.messages)
        for start in range(len(turns)):
            kept = [m for turn in turns[start:] for m in turn]
            ids = self.tokenizer.encode(self.render(self._with_system(kept)), add_special_tokens=False)
            if len(ids) <= max_prompt_tokens:
                return ids
        raise PromptTooLongError(
            f"the message is too long for the model's context ({max_prompt_tokens} prompt tokens allowed)"
        )

    def _with_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(messages)

    # -- persistence (plain JSON data only) --
    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "messages": [dict(m) for m in self.messages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, tokenizer: Any = None, system: str | None = None) -> "ChatPrompt":
        data = data or {}
        messages = [
            m for m in data.get("messages", [])
            if isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        ]
        return cls(tokenizer=tokenizer, system=data.get("system", system), messages=messages)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(system={self.system!r}, turns={len(self.messages)})"


def _group_turns(messages: Sequence[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Group messages into turns that start at each user message."""
    turns: list[list[dict[str, str]]] = []
    for m in messages:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns
