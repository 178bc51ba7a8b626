"""Paged KV-cache bookkeeping: which fixed-size blocks of cache slots each sequence owns.

The cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a list
of blocks (its block table); token ``i`` lives in slot ``block_table[i // block_size]`` at offset
``i % block_size``. Blocks need not be contiguous, so memory never fragments.

Prefix caching (vLLM's automatic prefix caching, as nano-vllm does it): once a block is full and
its K/V are computed, it is registered under a key made of its tokens and its prefix's hash, so
the key names the whole prefix up to the block's end. A new sequence whose prompt starts with a
registered prefix shares those blocks (reference-counted, read-only: only full blocks are shared
and a sequence only writes past them). A block whose last owner ends keeps its K/V and stays
registered; it is recycled, least recently used first, only when a free block is needed and no
never-used or unregistered one is left. So a chat's next turn, a regenerate, or an API client
resending its history computes only the new tokens.

A request's ``params.cache_salt`` stands in for the first block's parent (vLLM's cache salt), so
its whole chain of keys differs from any other salt's: requests share blocks only within one
salt. Only the blocks wholly inside ``params.cache_shared_tokens`` (a prompt's head that is the
server's own text, the same for every user) come before the salt and are shared by all salts. Without isolation, any client could confirm text another user sent (a guessed prompt that
matches is cached: it is faster and counts more hit tokens).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .sequence import Sequence

# A block's key: (hash of the previous block's key, or of the request's cache salt for the first block
# (0 without one); its tokens). Matching compares the tokens exactly; the prefix before them (and the
# salt) is trusted to its 64-bit hash, which Python keys with a random per-process secret for strings.
BlockKey = tuple[int, tuple[int, ...]]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[BlockKey, int] = {}
        # Unowned blocks: never used (ids >= num_ever_used), unregistered, and registered (LRU first).
        self._unregistered: deque[int] = deque()
        self._lru: OrderedDict[int, None] = OrderedDict()
        # Fresh blocks are handed out in id order before any recycled one, so blocks
        # [0, num_ever_used) are exactly those that ever held K/V (see ModelRunner's zeroing).
        self.num_ever_used = 0
        # Prompt tokens looked up in the prefix cache at admission, and how many were found.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence owns (registered ones included: they are reclaimed on demand)."""
        return self.num_blocks - self.num_ever_used + len(self._unregistered) + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        """Unowned blocks that still hold a registered prefix."""
        return len(self._lru)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._ref_count[block]

    # -- admission --
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks holding the longest cached prefix of ``seq``'s tokens.

        The last token is never matched, so the step that admits ``seq`` computes at least one
        token and has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(self._key_of(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int]) -> bool:
        unowned_hits = sum(1 for b in hits if self._ref_count[b] == 0)
        return self.blocks_for(seq.num_tokens) - len(hits) <= self.num_free_blocks - unowned_hits

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give ``seq`` the matched blocks, then fresh ones for the rest. Check :meth:`can_admit`."""
        for block in hits:
            if self._ref_count[block] == 0:
                del self._lru[block]
            self._ref_count[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += seq.num_computed_tokens
        self.grow(seq, seq.num_tokens)

    # -- growth and release --
    def missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks ``seq`` needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.missing_blocks(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` enough blocks for ``num_tokens`` tokens. Check :meth:`can_grow` first."""
        for _ in range(self.missing_blocks(seq, num_tokens)):
            block = self._take_free_block()
            self._ref_count[block] = 1
            seq.block_table.append(block)

    def register_computed(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that are full and computed, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        for i in range(seq.num_registered_blocks, seq.num_computed_tokens // self.block_size):
            key = self._key_of(seq, i)
            block = seq.block_table[i]
            if self._key[block] is None and key not in self._cached:  # else an equal block is there
                self._key[block] = key
                self._cached[key] = block
        seq.num_registered_blocks = max(seq.num_registered_blocks, seq.num_computed_tokens // self.block_size)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the shared beginnings of prompts are the last to be recycled.
        for block in reversed(seq.block_table):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                if self._key[block] is None:
                    self._unregistered.append(block)
                else:
                    self._lru[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def _take_free_block(self) -> int:
        if self.num_ever_used < self.num_blocks:
            self.num_ever_used += 1
            return self.num_ever_used - 1
        if self._unregistered:
            return self._unregistered.popleft()
        block, _ = self._lru.popitem(last=False)  # evict the least recently used prefix
        key = self._key[block]
        assert key is not None
        del self._cached[key]
        self._key[block] = None
        return block

    def block_key(self, seq: Sequence, i: int) -> BlockKey:
        """The prefix-cache key ``seq``'s full block ``i`` has or will have (its salt included)."""
        return self._key_of(seq, i)

    def _key_of(self, seq: Sequence, i: int) -> BlockKey:
        """Key of ``seq``'s block ``i`` (full), hashing the blocks before it once (memoised on seq)."""
        while len(seq.block_hashes) < i:
            j = len(seq.block_hashes)
            seq.block_hashes.append(hash(self._key_from(seq, j)))
        return self._key_from(seq, i)

    def _key_from(self, seq: Sequence, i: int) -> BlockKey:
        # The salt enters the chain at the first block not wholly within the prompt's shared head
        # (params.cache_shared_tokens: the server's own tokens), so salted requests share those blocks.
        salted_from = seq.params.cache_shared_tokens // self.block_size
        parent = seq.block_hashes[i - 1] if i > 0 else 0
        if i == salted_from:
            parent = _salt_hash(seq.params.cache_salt, parent)
        start = i * self.block_size
        return parent, tuple(seq.token_ids[start : start + self.block_size])


def _salt_hash(salt: str | None, parent: int = 0) -> int:
    if salt is None:
        return parent
    return hash(("cache_salt", salt)) if parent == 0 else hash(("cache_salt", salt, parent))
