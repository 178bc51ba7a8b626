"""Engines turn prompt token ids plus sampling parameters into streams of text deltas."""

from .protocol import Engine, FinishReason, GenerationOutput, GenerationStream
from .sampling_params import InvalidSamplingParams, SamplingParams

__all__ = [
    "Engine",
    "FinishReason",
    "GenerationOutput",
    "GenerationStream",
    "InvalidSamplingParams",
    "SamplingParams",
]
