"""Paged KV-cache bookkeeping: which fixed-size blocks of cache slots each sequence owns.

The cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a list
of blocks (its block table); token ``i`` lives in slot ``block_table[i // block_size]`` at offset
``i % block_size``. Blocks need not be contiguous, so memory never fragments and a finished
sequence's blocks go straight back to the pool.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        # Fresh blocks are handed out in id order before any recycled one, so blocks
        # [0, num_ever_used) are exactly those that ever held K/V (see ModelRunner's zeroing).
        self.num_ever_used = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks ``seq`` needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.missing_blocks(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks for ``num_tokens`` tokens. Check :meth:`can_grow` first."""
        for _ in range(self.missing_blocks(seq, num_tokens)):
            block = self._free.popleft()
            self.num_ever_used = max(self.num_ever_used, block + 1)
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
