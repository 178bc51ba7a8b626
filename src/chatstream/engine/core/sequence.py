"""One request's state inside the engine: its tokens, its KV blocks, and how far the model got."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..sampling_params import SamplingParams
from ..stream import RequestStream
from .detokenizer import IncrementalDetokenizer
from .stop_strings import StopStringMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens of one request.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache. A sequence is *prefilling*
    while more than one token lacks K/V (a new prompt, or a preempted sequence being recomputed);
    afterwards each step computes exactly its last sampled token.
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    seed: int
    stream: RequestStream
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache hashes of the first full blocks of token_ids (content only: kept across preemption).
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)  # not yet sent with an output
    # The grammar's llguidance matcher, compiled off the engine thread before the sequence is
    # scheduled (LLMEngine._compile).
    matcher: Any = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
