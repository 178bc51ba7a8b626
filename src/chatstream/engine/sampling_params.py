"""Per-request sampling parameters, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled. Every request in a batch carries its own.

    ``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    ``seed`` makes a sampled reply reproducible whatever else shares the batch.
    ``stop`` strings end the reply and are never shown to the client.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               "max_new_tokens", "must be an integer >= 1")
        _check(_is_number(self.temperature) and 0.0 <= self.temperature <= 100.0,
               "temperature", "must be a number between 0 and 100")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0.0,
               "repetition_penalty", "must be a number > 0")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
               "seed", "must be an integer")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(len(self.stop) <= 16, "stop", "at most 16 stop strings")


class InvalidSamplingParams(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(param, message)
