"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

Every step, running sequences go first: each decoding one computes its one new token, then each
prefilling one its next chunk of prompt. Then waiting sequences are admitted in arrival order
while their whole prompt fits in free KV blocks (a prefix already in the cache is shared, not
recomputed), ``max_num_seqs`` allows, and the step's token
budget (``max_num_batched_tokens``) has room; a long prompt is prefilled in chunks so it never
stalls running decodes for long. When a running sequence needs a block and none is free, the
newest running sequence is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed from its tokens later (cheaper to write than swapping KV out).

A waiting sequence whose next uncached prompt block is one a running sequence is about to compute
(the same key: the same tokens after the same prefix, under the same cache salt) waits until that
block is registered, then shares it from the cache instead of computing it again: ``n`` choices of
one request, or any burst of identical prompts from one user, compute their common prompt once
(the first is admitted at once, the others when the block is in the cache; meanwhile those behind
them in the queue may be admitted, and the ones waiting to share stay first in line).

A recomputed sequence computes exactly what it computed the first time: its prompt in prefill
chunks that end where the prompt ends, then its reply so far one token a step, which runs
through the decode path as those tokens first did. One prefill over the reply would be a
different computation (other kernels, another summation order) whose K/V may differ in the last
bits, and a later greedy token could then flip where two candidates nearly tie.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``seq``, starting at ``seq.num_computed_tokens``, run this step."""

    seq: Sequence
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the last token, so the step samples a new one."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Sequences that own the whole cache and need more: they can only end ("length").
    out_of_memory: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._preempted_this_step = False
        self.num_preemptions = 0
        self.num_shared_waits = 0  # admissions put off a step to share a prompt block being computed

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Retire ``seq`` (finished, cancelled or failed) and give its blocks back at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._preempted_this_step = False
        # Decodes before prefill chunks, so a long prompt never takes the budget from them.
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if seq.status is not SequenceStatus.RUNNING:  # preempted to make room for an older one
                continue
            n = _chunk_size(seq, budget)
            if n == 0:
                continue
            if not self._make_room(seq, seq.num_computed_tokens + n):
                if len(self.running) == 1:
                    out.out_of_memory.append(seq)
                else:
                    self._preempt(seq)  # the newest: everyone left is older and has its blocks
                continue
            self.block_manager.grow(seq, seq.num_computed_tokens + n)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        # Admitting right after preempting would only thrash.
        sharing: list[Sequence] = []  # put off to share a block being computed; first in line next step
        while (
            not self._preempted_this_step
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            hits = self.block_manager.match_prefix(self.waiting[0])
            if len(sharing) < self.max_num_seqs and self._computing(self.waiting[0], len(hits)):
                sharing.append(self.waiting.popleft())  # (a bounded scan of a long queue of them)
                self.num_shared_waits += 1
                continue
            if not self.block_manager.can_admit(self.waiting[0], hits):
                break
            seq = self.waiting.popleft()
            self.block_manager.admit(seq, hits)  # the cached prefix counts as computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = _chunk_size(seq, budget)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(sharing))
        return out

    def _computing(self, seq: Sequence, block: int) -> bool:
        """Whether a running sequence will compute and register ``seq``'s prompt block ``block`` (the
        first one the cache lacks), so that ``seq`` can share it by waiting."""
        blocks = self.block_manager
        if not blocks.enable_prefix_caching or block >= (seq.num_tokens - 1) // blocks.block_size:
            return False  # only full blocks before the last token are ever matched
        end = (block + 1) * blocks.block_size
        key = None
        for other in self.running:
            if other.num_registered_blocks <= block and end <= other.num_tokens:
                key = blocks.block_key(seq, block) if key is None else key
                if blocks.block_key(other, block) == key:
                    return True
        return False

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the newest other sequences until ``seq`` can hold ``num_tokens`` tokens."""
        while not self.block_manager.can_grow(seq, num_tokens):
            if self.running[-1] is seq:
                return False
            self._preempt(self.running[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._preempted_this_step = True
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)


def _chunk_size(seq: Sequence, budget: int) -> int:
    """Tokens of ``seq`` to compute this step: as many as the budget allows, except that a sequence
    recomputed after preemption goes as it went the first time (see the module's docstring)."""
    n = min(seq.num_uncomputed_tokens, budget)
    if seq.num_completion_tokens == 0:
        return n  # a new prompt
    if seq.num_computed_tokens < seq.num_prompt_tokens:
        return min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
    return min(n, 1)
