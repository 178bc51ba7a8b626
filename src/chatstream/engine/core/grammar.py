"""Grammar-constrained decoding with llguidance: structured output and forced tool calls.

A request's :attr:`SamplingParams.grammar` is an llguidance grammar (a JSON schema, a Lark
grammar with ``%json`` parts, ...; see :mod:`chatstream.service.structured`). Each constrained
sequence keeps one matcher; every step the engine asks it for the tokens allowed next (a bitmask
over the vocabulary, one bit a token) and the sampler removes the others from that row while it
draws (:func:`.sampler.sample`'s ``mask``), then the engine feeds the matcher the sampled token. Only constrained rows pay for it, and they share the step with free rows.
llguidance is what vLLM, SGLang and llama.cpp use for this; it computes a mask in well under a
millisecond for typical JSON schemas.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (the message says why)."""


def check_grammar(grammar: str) -> None:
    """Raise :class:`GrammarError` for a grammar that cannot compile (no tokenizer needed)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error)


class GrammarMasks:
    """Matchers for one tokenizer, and the step's masking of constrained rows."""

    def __init__(self, tokenizer: Any) -> None:
        self._hf_tokenizer = tokenizer
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        with self._lock:  # built once, on first use (about 1.5 s for a 49k vocabulary)
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
            return self._tokenizer

    def matcher(self, grammar: str) -> Any:
        import llguidance

        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher

    def masks(self, matchers: Sequence[Any | None]) -> torch.Tensor:
        """The tokens each row may take next, packed as :func:`.sampler.pack_mask` reads them (int32
        ``[rows, words]``, bit ``i % 32`` of word ``i // 32`` = token ``i``); a row without a
        matcher (None) allows every token. The sampler applies it (the native kernel to a copy of
        each constrained row), so a free row in the same step pays nothing for it."""
        import llguidance.torch as llg_torch

        bitmask = llg_torch.allocate_token_bitmask(len(matchers), self._llg_tokenizer().vocab_size)
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                llg_torch.fill_next_token_bitmask(matcher, bitmask, row)
        return bitmask
