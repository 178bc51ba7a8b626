"""Token counting for a remote engine: what truncation to the context needs, and nothing more.

The front renders nothing the upstream generates from (it sends messages; the upstream applies
its own chat template), but it must still drop the oldest turns so that the prompt fits the
context. It counts with, in order of preference:

1. the model's own tokenizer, loaded locally (``--tokenizer``: a Hugging Face folder or a
   ``.gguf`` file; only the tokenizer is read, never the weights): exact;
2. the upstream's ``POST /tokenize`` (vLLM, SGLang, llama.cpp's server, chatstream): exact token
   counts of a ChatML rendering, which is close to any chat template's size;
3. an estimate, where the upstream has no ``/tokenize`` (``transformers serve``, TGI, OpenAI):
   one token per two bytes of UTF-8, which over-counts English about twice, so a conversation
   is cut earlier than needed rather than overflowing the upstream's context.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from .engine import RemoteEngine, tokenize_body, tokens_of

logger = logging.getLogger("chatstream")

BYTES_PER_TOKEN_ESTIMATE = 2


def load_local_tokenizer(path: str) -> Any:
    """The tokenizer of a local Hugging Face model folder or ``.gguf`` file, without the weights."""
    from transformers import AutoTokenizer

    location = Path(path).expanduser()
    if location.suffix == ".gguf" and location.is_file():
        return AutoTokenizer.from_pretrained(location.parent, gguf_file=location.name)
    if not location.is_dir():
        raise ValueError(f"--tokenizer: no Hugging Face model folder or .gguf file at {location}")
    return AutoTokenizer.from_pretrained(location, local_files_only=True)


class RemoteTokenizer:
    """Counts tokens on a healthy upstream of ``engine``; renders plain ChatML, for counting only.

    The ids it returns are only good for ``len()`` (they are zeros): a remote engine sends the
    messages, never ids.
    Its calls block (up to ``timeout_s``): the service runs them in a worker thread.
    """

    chat_template = "chatml"  # what ChatPrompt checks for; rendering is below

    def __init__(self, engine: RemoteEngine, timeout_s: float = 5.0, cache_size: int = 4096) -> None:
        self.engine = engine
        self._client = httpx.Client(timeout=timeout_s, headers=engine.headers)
        # Every turn re-counts the stored messages it keeps: remember counts, not one call per message.
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        upstream = self.engine.tokenize_upstream()
        if upstream is not None and upstream.tokenize in ("vllm", "llama.cpp"):
            key = hashlib.blake2b(f"{upstream.url}\0{text}".encode(), digest_size=16).digest()
            if (count := self._counts.get(key)) is not None:
                self._counts.move_to_end(key)
                return [0] * count
            body = tokenize_body(upstream.tokenize, text, self.engine.model or upstream.model)
            try:
                response = self._client.post(upstream.url + "/tokenize", json=body)
                tokens = tokens_of(response) if response.status_code == 200 else None
                if tokens is not None:
                    self._counts[key] = len(tokens)
                    if len(self._counts) > self._cache_size:
                        self._counts.popitem(last=False)
                    return [0] * len(tokens)
                logger.warning("upstream %s: /tokenize answered HTTP %s; estimating", upstream.url, response.status_code)
            except httpx.HTTPError as exc:
                logger.warning("upstream %s: /tokenize failed (%s); estimating", upstream.url, exc)
        return [0] * estimate_tokens(text)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **_: Any) -> Any:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text

    def close(self) -> None:
        self._client.close()


def estimate_tokens(text: str) -> int:
    """A conservative token count: one token per two bytes of UTF-8 (rounded up)."""
    return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN_ESTIMATE)


def describe_counting(tokenizer: Any, tokenizer_path: str | None) -> str:
    """How truncation counts tokens, for the start-up log."""
    if not isinstance(tokenizer, RemoteTokenizer):
        return f"the local tokenizer {tokenizer_path}" if tokenizer_path else "the given tokenizer"
    return ("the upstream's /tokenize where it has one, else an estimate of one token per "
            f"{BYTES_PER_TOKEN_ESTIMATE} bytes (give --tokenizer for exact counts)")
