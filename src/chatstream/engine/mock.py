"""A model-free engine that streams canned text with realistic per-token delays.

It is a product feature for UI and integration work (``chatstream serve --mock``): the whole
server, queue and session machinery runs exactly as with a model, only the text is canned.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Sequence
from typing import Any

from .protocol import GenerationOutput
from .sampling_params import SamplingParams
from .stream import RequestStream

_REPLIES = [
    "Here is a short answer.\n\n- First point\n- Second point\n\n```python\nprint(\"hello\")\n```\n\nAnything else?",
    "Sure! **Streaming** works: each word arrives on its own, so you can watch the reply being written.",
    "That is a good question. A mock engine answers without a model, which is handy for building user interfaces.",
]


class MockTokenizer:
    """Byte-level stand-in tokenizer used with the mock engine when no real tokenizer is given.

    Ids 0-255 are UTF-8 bytes; the chat template is ChatML, like the default model's.
    """

    eos_token_id = 256
    eos_token = "<|im_end|>"
    chat_template = "chatml"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False, **_: Any
    ) -> Any:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


_LAST_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


class MockEngine:
    """Streams a canned reply word by word, honouring max_new_tokens, stop strings and cancel."""

    def __init__(self, tokenizer: Any = None, token_delay: float = 0.03) -> None:
        self.tokenizer = tokenizer or MockTokenizer()
        self.token_delay = token_delay
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def ready(self) -> bool:
        return True

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
        *, messages: Sequence[dict[str, str]] | None = None,
    ) -> RequestStream:
        loop = asyncio.get_running_loop()
        stream = RequestStream(loop, self._cancel, request_id)
        prompt = list(prompt_token_ids)
        task = loop.create_task(self._run(stream, prompt, params))
        self._tasks[stream.request_id] = task

        def done(_task: asyncio.Task[None]) -> None:
            self._tasks.pop(stream.request_id, None)
            # A task cancelled before its first step never ran its body: end the stream here.
            stream.put_nowait(GenerationOutput(
                text="", finished=True, finish_reason="cancelled", prompt_tokens=len(prompt),
            ))

        task.add_done_callback(done)
        return stream

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _reply_for(self, prompt_ids: list[int], seed: int | None) -> str:
        prompt = self.tokenizer.decode(prompt_ids)
        users = _LAST_USER.findall(prompt)
        last = users[-1] if users else prompt[-200:]
        rng = random.Random(seed if seed is not None else len(prompt))
        return f"You said: {last}\n\n{rng.choice(_REPLIES)}"

    async def _run(self, stream: RequestStream, prompt_ids: list[int], params: SamplingParams) -> None:
        pieces = re.findall(r"\s*\S+|\s+", self._reply_for(prompt_ids, params.seed))
        emitted = 0
        text = ""
        reason = "stop"
        try:
            for piece in pieces:
                if emitted >= params.max_new_tokens:
                    reason = "length"
                    break
                await asyncio.sleep(self.token_delay)
                candidate = text + piece
                hit = min((candidate.find(s) for s in params.stop if s in candidate), default=-1)
                if hit >= 0:
                    if hit > len(text):
                        stream.put_nowait(GenerationOutput(text=candidate[len(text):hit]))
                    emitted += 1
                    break
                text = candidate
                emitted += 1
                stream.put_nowait(GenerationOutput(text=piece))
        except asyncio.CancelledError:
            reason = "cancelled"
        stream.put_nowait(
            GenerationOutput(
                text="", finished=True, finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=len(prompt_ids), completion_tokens=emitted,
            )
        )
