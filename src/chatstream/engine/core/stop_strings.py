"""Stop strings matched on text, across token boundaries, without ever showing them.

Text that could be the start of a stop string is held back until the next delta settles it: either
the stop string completes (the reply ends before it) or the text turns out to be ordinary and is
released. Any occurrence of a stop string must begin inside the held-back text or the new delta,
so each step only scans those: O(len(stop) + len(delta)) per step.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text. Returns ``(text safe to show, stopped)``."""
        if not self._stop:
            return delta, False
        text = self._held + delta
        hit = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            return text[:hit], True
        keep = self._partial_match_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The reply ended for another reason: held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(len(text), max(len(s) for s in self._stop) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
