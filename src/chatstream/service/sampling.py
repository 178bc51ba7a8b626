"""From a request's generation options to :class:`SamplingParams`, the same way for every face.

Each face parses its own wire format and names (``max_tokens`` on both wires, ``max_new_tokens``
inside) and hands over the values under the engine's names, with a table back to its own names so
that an error names the field the client sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..engine import InvalidSamplingParams, SamplingParams
from ..errors import InvalidParams


@dataclass(frozen=True)
class SamplingLimits:
    """What a request may ask for on this server."""

    max_new_tokens: int  # longer asks are clamped (the reply then ends with finish_reason "length")
    vocab_size: int | None = None  # top_k may not exceed it


def to_sampling_params(
    defaults: SamplingParams,
    limits: SamplingLimits,
    values: Mapping[str, Any],
    wire_names: Mapping[str, str] | None = None,
) -> SamplingParams:
    """``defaults`` with ``values`` (engine names) applied, checked against ``limits``.

    Raises :class:`InvalidParams` naming the field as the client called it (``wire_names`` maps
    engine names to wire names).
    """
    names = wire_names or {}
    values = dict(values)
    asked = values.get("max_new_tokens")
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > limits.max_new_tokens:
        values["max_new_tokens"] = limits.max_new_tokens
    top_k = values.get("top_k")
    if limits.vocab_size and isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > limits.vocab_size:
        name = names.get("top_k", "top_k")
        raise InvalidParams(f"'{name}' must be at most {limits.vocab_size} (the vocabulary size)", param=name)
    try:
        return replace(defaults, **values)
    except InvalidSamplingParams as exc:
        name = names.get(exc.param, exc.param)
        raise InvalidParams(f"'{name}' {exc.reason}", param=name) from None
