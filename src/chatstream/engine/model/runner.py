"""Runs a transformers causal LM on one flattened ragged batch per step.

Each step is a single forward over ``[1, N]`` tokens: one token per decoding sequence, then the
prompt chunks of prefilling ones. The model is any transformers causal LM, unchanged: only its
attention implementation is swapped for :mod:`.attention`, and the step's batch layout travels to
it as an extra forward kwarg. Logits are computed only for each sequence's last token.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

from ..core.block_manager import BlockManager
from ..core.scheduler import ScheduledChunk
from ..ops.native import NativeKernels
from . import attention, llama
from .attention import BatchMetadata, PagedKVCache, PrefillSegment
from .backend import Backend, select_backend


def attention_shape(config: Any) -> tuple[int, int, int, int]:
    """(layers, attention heads, KV heads, head dim) of a decoder config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return config.num_hidden_layers, num_heads, num_kv_heads, head_dim


def kv_bytes_per_token(model: Any, dtype: torch.dtype | None = None) -> int:
    """Bytes of K/V one token takes in a cache of ``dtype`` (the model's by default)."""
    layers, _, kv_heads, head_dim = attention_shape(model.config)
    return 2 * layers * kv_heads * head_dim * (dtype or model.dtype).itemsize


class ModelRunner:
    """Runs the model on the path of ``backend`` (:func:`.backend.select_backend`: by default
    chosen here from ``fused`` and ``kernels``). ``fused``: run Llama-family models through
    :mod:`.llama`'s fused forward (same tokens, fewer operators); other models, or ``fused=False``,
    run through transformers' own forward. ``kernels``: ``"auto"`` runs the fused forward's RoPE,
    KV writes, decode attention (and int8 layers, on CPUs with AVX-512 VNNI) through
    :mod:`..ops.native`'s kernels for a float32 model on CPU when they build and pass their check,
    ``"native"`` requires them, ``"torch"`` uses PyTorch's operators only.

    ``lanes``: how many threads compute one step of the fused forward on CPU, each over its own
    share of the step's sequences (:func:`split_lanes`). The native kernels run on one core each,
    so on a 2-core machine a step of 16 decodes runs on one core while the other mostly waits; two
    lanes run two half-batches at once, which pays only where the second core is free (on a
    saturated machine two lanes measured 0.86x one). A row's logits never depend on what else
    shares its forward, so the tokens are the same for any ``lanes``."""

    def __init__(
        self, model: Any, blocks: BlockManager, *, fused: bool = True, kernels: str = "auto", threads: int | None = None,
        lanes: int = 1,
        kv_cache_dtype: str = "auto", backend: tuple[Backend, NativeKernels | None] | None = None,
    ) -> None:
        self.model = model
        self.device = model.device
        self.blocks = blocks
        self.block_size = block_size = blocks.block_size
        # The engine selects the backend first (its KV dtype sizes the blocks) and passes it in.
        self.backend, self.native = backend or select_backend(
            model, fused=fused, kernels=kernels, threads=threads, block_size=block_size, kv_cache_dtype=kv_cache_dtype
        )
        layers, _, self.num_kv_heads, head_dim = attention_shape(model.config)
        shape = (blocks.num_blocks, self.num_kv_heads, 2, block_size, head_dim)
        # torch.empty, so host memory is only committed as the cache fills; blocks are zeroed on
        # first use instead, because decode reads the unused tail of a sequence's last block (masked
        # out, but NaN garbage times a zero weight would still be NaN).
        self.cache = PagedKVCache(
            [torch.empty(shape, dtype=self.backend.kv_torch_dtype, device=self.device) for _ in range(layers)]
        )
        self._num_zeroed = 0
        self.fused = llama.LlamaForward(model, self.backend, self.native) if self.backend.forward == "fused" else None
        # transformers' forward: PyTorch's decode attention, as the backend chose it (the native one needs the fused forward).
        self._hf_decode = attention.TORCH_DECODE["flash" if self.backend.decode_attention == "flash" else "bmm"]
        if lanes < 1:
            raise ValueError("lanes must be >= 1")
        # Only the fused forward on CPU is split: transformers' forward and GPUs gain nothing from it.
        self.lanes = lanes if self.fused is not None and self.device.type == "cpu" else 1
        self._pool = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix="chatstream-lane") if self.lanes > 1 else None
        self.num_split_steps = 0  # steps whose forward ran in more than one lane
        attention.register()
        self._previous_attn = model.config._attn_implementation
        model.set_attn_implementation(attention.ATTENTION_NAME)

    def close(self) -> None:
        """Give the model its own attention back and drop the cache."""
        if self._pool is not None:
            self._pool.shutdown()
        self.model.set_attn_implementation(self._previous_attn)
        self.cache.layers.clear()

    def execute(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Run one step. Returns the chunks that reached their sequence's end, and their logits."""
        if self.blocks.num_ever_used > self._num_zeroed:
            for layer in self.cache.layers:
                layer[self._num_zeroed : self.blocks.num_ever_used].zero_()
            self._num_zeroed = self.blocks.num_ever_used
        groups = split_lanes(chunks, self.lanes) if self._pool is not None else [chunks]
        if len(groups) == 1:
            sampled, logits = self._run(chunks)
        else:
            self.num_split_steps += 1
            results = self.map_lanes(self._run, groups)
            sampled = [c for lane_sampled, _ in results for c in lane_sampled]
            logits = torch.cat([lane_logits for _, lane_logits in results])
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        return sampled, logits

    def map_lanes(self, fn: Callable[[_P], _R], parts: list[_P]) -> list[_R]:
        """``[fn(part) for part in parts]``, the parts at once, one per lane (the first on the
        calling thread). Returns only when every part is done, even when one fails: no lane may
        still be writing the cache when the next step is planned."""
        if self._pool is None or len(parts) == 1:
            return [fn(part) for part in parts]
        futures = [self._pool.submit(_in_inference_mode, fn, part) for part in parts[1:]]
        try:
            first = fn(parts[0])
        finally:
            wait(futures)
        return [first] + [f.result() for f in futures]

    def _run(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """One forward over ``chunks``: the logits of those that complete their sequence."""
        # Single-token chunks (decodes) first: the attention computes them together.
        ordered = [c for c in chunks if c.num_tokens == 1] + [c for c in chunks if c.num_tokens > 1]
        sampled = [c for c in ordered if c.completes]
        meta, input_ids, positions, keep = self._prepare(ordered)
        if self.fused is not None:
            return sampled, self.fused.forward(input_ids[0], positions[0], meta, keep)
        logits = self.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=keep,
            chatstream_batch=meta,
            chatstream_decode=self._hf_decode,
        ).logits[0]
        return sampled, logits

    def _prepare(
        self, ordered: list[ScheduledChunk]
    ) -> tuple[BatchMetadata, torch.Tensor, torch.Tensor, torch.Tensor]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        write_blocks: list[int] = []
        pair_blocks: list[int] = []
        pair_rows: list[int] = []
        pair_lengths: list[int] = []
        decode_starts: list[int] = [0]
        decode_lengths: list[int] = []
        keep: list[int] = []
        prefills: list[PrefillSegment] = []
        num_decode = 0
        for chunk in ordered:
            seq, start, n = chunk.seq, chunk.seq.num_computed_tokens, chunk.num_tokens
            table = seq.block_table
            row = len(ids)
            ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            write_blocks += [table[p // bs] for p in range(start, start + n)]
            if chunk.completes:
                keep.append(row + n - 1)
            if n == 1:
                num_blocks = start // bs + 1
                pair_blocks += table[:num_blocks]
                pair_rows += [num_decode] * num_blocks
                pair_lengths += [bs] * (num_blocks - 1) + [start % bs + 1]
                decode_starts.append(len(pair_blocks))
                decode_lengths.append(start + 1)
                num_decode += 1
            else:
                past = None
                if start > 0:
                    past = torch.tensor(table[: -(-(start + n) // bs)], device=self.device)
                prefills.append(PrefillSegment(row, row + n, start, past))
        dev = self.device
        pos = torch.tensor(positions, device=dev)
        token_blocks = torch.tensor(write_blocks, dtype=torch.long, device=dev)
        token_offsets = pos % bs
        # Cache row of (kv head h, key|value k, token n): ((block * Hkv + h) * 2 + k) * bs + offset.
        token_base = token_blocks * (self.num_kv_heads * 2 * bs) + token_offsets
        head_base = torch.arange(self.num_kv_heads * 2, device=dev) * bs
        lengths = torch.tensor(pair_lengths, device=dev)
        padding = torch.arange(bs, device=dev)[None, :] >= lengths[:, None]  # [P, bs]
        bias = torch.zeros(padding.shape, device=dev).masked_fill_(padding, float("-inf"))
        meta = BatchMetadata(
            cache=self.cache,
            write_index=(head_base[:, None] + token_base[None, :]).flatten(),
            num_decode=num_decode,
            pair_blocks=torch.tensor(pair_blocks, dtype=torch.long, device=dev),
            pair_rows=torch.tensor(pair_rows, dtype=torch.long, device=dev),
            pair_bias=bias.repeat_interleave(self.num_kv_heads, dim=0)[:, None, :],
            prefills=prefills,
            decode_starts=torch.tensor(decode_starts, dtype=torch.long, device=dev),
            decode_lengths=torch.tensor(decode_lengths, dtype=torch.long, device=dev),
            token_blocks=token_blocks,
            token_offsets=token_offsets,
        )
        input_ids = torch.tensor(ids, device=dev)[None, :]
        return meta, input_ids, pos[None, :], torch.tensor(keep, dtype=torch.long, device=dev)


_P = TypeVar("_P")
_R = TypeVar("_R")


def _in_inference_mode(fn: Callable[[_P], _R], part: _P) -> _R:
    with torch.inference_mode():  # thread-local: a lane's thread enters it itself
        return fn(part)


# A lane of fewer tokens than this would spend more on reading every weight once more than it saves.
MIN_LANE_TOKENS = 4


def split_lanes(chunks: list[ScheduledChunk], lanes: int) -> list[list[ScheduledChunk]]:
    """Share a step's chunks among at most ``lanes`` forwards of about the same number of tokens.

    Decodes are dealt out in even runs; each prefill chunk goes to the lane with the fewest tokens.
    Lanes of fewer than :data:`MIN_LANE_TOKENS` tokens are not made: small steps run whole.
    """
    total = sum(c.num_tokens for c in chunks)
    lanes = min(lanes, total // MIN_LANE_TOKENS)
    if lanes <= 1:
        return [chunks]
    decodes = [c for c in chunks if c.num_tokens == 1]
    groups: list[list[ScheduledChunk]] = [[] for _ in range(lanes)]
    load = [0] * lanes
    # Prefill chunks first, largest first, each to the lightest lane; then decodes fill the rest evenly.
    for chunk in sorted((c for c in chunks if c.num_tokens > 1), key=lambda c: -c.num_tokens):
        lane = load.index(min(load))
        groups[lane].append(chunk)
        load[lane] += chunk.num_tokens
    for chunk in decodes:
        lane = load.index(min(load))
        groups[lane].append(chunk)
        load[lane] += 1
    return [g for g in groups if g]
