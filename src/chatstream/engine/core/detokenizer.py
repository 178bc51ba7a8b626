"""Incremental detokenization: turn one new token at a time into new text, O(new tokens) a step.

A token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK across
tokens), so text is only released once it decodes cleanly; the deltas then concatenate exactly to
``tokenizer.decode(all_ids, skip_special_tokens=True)``. Fast (Rust) tokenizers use
``tokenizers.decoders.DecodeStream``, which keeps a small window of recent ids; other tokenizers
use the same windowed idea in Python.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream: Any = DecodeStream(skip_special_tokens=True)
        else:
            self._tokenizer = tokenizer
            self._ids: list[int] = []
            self._prefix_offset = 0  # window start: decoding from here gives stable text
            self._read_offset = 0  # ids up to here are already emitted

    def step(self, token_id: int) -> str:
        """Feed one token; return the text it completes (often "", never a broken character)."""
        if self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        return self._step_slow(token_id)

    def _step_slow(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]
