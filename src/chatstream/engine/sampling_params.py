"""Per-request sampling parameters, validated once at the edge.

Every bound here is also what keeps one request from hurting the others: the engine packs all
rows' parameters into shared tensors, so a value that does not fit its tensor's type (an int64
``top_k``, a NaN temperature) must be refused before it ever reaches a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_INT32_MAX = 2**31 - 1
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled. Every request in a batch carries its own.

    ``temperature == 0`` means greedy. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` switch
    those filters off; a ``top_k`` above the vocabulary size keeps the whole vocabulary. ``min_p``
    keeps the tokens at least ``min_p`` times as likely as the most likely one.
    ``repetition_penalty`` (HF semantics, over prompt and reply) divides a seen token's positive
    logit and multiplies a negative one; ``presence_penalty`` and ``frequency_penalty`` (OpenAI
    semantics, over the reply) subtract ``presence`` once and ``frequency`` per occurrence.
    ``seed`` makes a sampled reply reproducible whatever else shares the batch; any int64 or
    uint64 value is accepted (the engine folds it to 64 bits).
    ``stop`` strings end the reply and are never shown to the client.
    ``cache_salt`` is not a sampling knob but travels with the request like one: requests share
    prefix-cache blocks only when their salts are equal (vLLM's ``cache_salt``), so the service
    gives each user its own and nobody can time or count another user's cached text. ``None``
    shares with every other unsalted request.
    ``grammar`` (an llguidance grammar: see :mod:`chatstream.service.structured`) allows only
    replies it matches; ``logit_bias`` adds a bias to the logits of some token ids.
    ``response_format`` is the OpenAI ``response_format`` the grammar was made from, as JSON text
    (``{"type": "json_schema", "json_schema": {...}}``): a grammar cannot be turned back into a
    schema, and a remote engine sends this instead, for its upstream to enforce.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    cache_salt: str | None = None
    # Leading prompt tokens that are the server's own (chat template head, default system prompt):
    # whole blocks of them are shared across salts, since they hold nothing any user wrote.
    cache_shared_tokens: int = 0
    grammar: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    response_format: str | None = None
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely (k <= 20)

    max_logit_bias = 300  # entries, as OpenAI allows

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= _INT32_MAX,
               "max_new_tokens", f"must be an integer between 1 and {_INT32_MAX}")
        _check(_is_finite(self.temperature) and 0.0 <= self.temperature <= 100.0,
               "temperature", "must be a finite number between 0 and 100")
        _check(_is_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be a finite number in (0, 1]")
        _check(_is_int(self.top_k) and 0 <= self.top_k <= _INT32_MAX,
               "top_k", f"must be an integer between 0 and {_INT32_MAX}")
        _check(_is_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 100.0,
               "repetition_penalty", "must be a finite number in (0, 100]")
        _check(_is_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be a finite number in [0, 1]")
        _check(_is_finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
               "presence_penalty", "must be a finite number between -2 and 2")
        _check(_is_finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
               "frequency_penalty", "must be a finite number between -2 and 2")
        _check(self.seed is None or (_is_int(self.seed) and _INT64_MIN <= self.seed <= _UINT64_MAX),
               "seed", "must be an integer in the int64 or uint64 range")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        _check(self.cache_salt is None or isinstance(self.cache_salt, str), "cache_salt", "must be a string")
        _check(_is_int(self.cache_shared_tokens) and 0 <= self.cache_shared_tokens <= _INT32_MAX,
               "cache_shared_tokens", f"must be an integer between 0 and {_INT32_MAX}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
               "logprobs", "must be an integer between 0 and 20")
        _check(self.grammar is None or (isinstance(self.grammar, str) and 0 < len(self.grammar) <= 1 << 20),
               "grammar", "must be a non-empty string of at most 1 MiB")
        _check(self.response_format is None or (isinstance(self.response_format, str)
                                                 and 0 < len(self.response_format) <= 1 << 20),
               "response_format", "must be a non-empty string of at most 1 MiB")
        _check(self.response_format is None or self.grammar is not None,
               "response_format", "travels with the grammar made from it")
        try:
            object.__setattr__(self, "logit_bias", tuple(dict(self.logit_bias).items()))
        except (TypeError, ValueError):
            raise InvalidSamplingParams("logit_bias", "must map token ids to numbers") from None
        _check(len(self.logit_bias) <= self.max_logit_bias, "logit_bias", f"at most {self.max_logit_bias} entries")
        _check(all(_is_int(t) and 0 <= t <= _INT32_MAX and _is_finite(b) and -100 <= b <= 100
                   for t, b in self.logit_bias), "logit_bias", "maps token ids to numbers between -100 and 100")


class InvalidSamplingParams(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param
        self.reason = message


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _is_finite(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(param, message)
