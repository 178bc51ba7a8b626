"""Engines turn prompt token ids plus sampling parameters into streams of text deltas."""

from typing import TYPE_CHECKING, Any

from .protocol import Engine, FinishReason, GenerationOutput, GenerationStream
from .sampling_params import InvalidSamplingParams, SamplingParams

if TYPE_CHECKING:
    from .core.llm_engine import LLMEngine

__all__ = [
    "Engine",
    "FinishReason",
    "GenerationOutput",
    "GenerationStream",
    "InvalidSamplingParams",
    "LLMEngine",
    "SamplingParams",
]


def __getattr__(name: str) -> Any:
    # Imported lazily: it pulls in torch, which the mock engine and the web layers never need.
    if name == "LLMEngine":
        from .core.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
