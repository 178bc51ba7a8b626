"""Paged attention, plugged into any transformers model through ``AttentionInterface``.

The model runs one flattened ragged batch per step (``[1, N]`` tokens from many sequences), so
its own attention cannot be used: this function, called once per layer with that layer's new
queries, keys and values (RoPE already applied), writes the new K/V into the paged cache and
attends each token to its own sequence only. Transformers builds no mask for an implementation
name it does not know, so nothing quadratic in ``N`` is ever made.

Layout: rows ``[0, num_decode)`` of the batch are single tokens attending to cached context
(decodes), computed together with one gather per layer; after them come prefill segments, each
computed with SDPA (causal, plus the cached part of the prompt when prefill is chunked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..ops.native import keys_in_order

ATTENTION_NAME = "chatstream_paged"
# PyTorch's CPU flash-attention kernel, which also returns each query's log-sum-exp.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class PagedKVCache:
    """Per layer one tensor ``[num_blocks, num_kv_heads, 2, block_size, head_dim]`` (2: key, value),
    of the backend's KV dtype: the model's, or 16-bit under a float32 model (``--kv-cache-dtype``),
    rounded as it is written and widened to the queries' dtype as it is read.

    Keys and values of a block sit side by side so one gather per layer fetches both, and each
    (block, head) slice of keys is a contiguous ``[block_size, head_dim]`` matrix for matmul.
    """

    layers: list[torch.Tensor]


@dataclass
class PrefillSegment:
    start: int  # first row of the segment in the flattened batch
    end: int
    num_past: int  # tokens of this sequence already in the cache before the segment
    past_blocks: torch.Tensor | None  # blocks covering past + segment, when num_past > 0


@dataclass
class BatchMetadata:
    """What every layer needs about the step's batch, built once per step by the model runner."""

    cache: PagedKVCache
    # Row of ``cache.layers[i].view(-1, head_dim)`` for each new (kv head, key|value, token).
    write_index: torch.Tensor  # [Hkv * 2 * N]
    num_decode: int
    # Decode attention runs over (row, block) pairs: every block of every decoding sequence.
    pair_blocks: torch.Tensor  # [P]
    pair_rows: torch.Tensor  # [P] which decode row each pair belongs to
    # [P * Hkv, 1, block_size] float32: 0, or -inf for slots past the sequence end.
    pair_bias: torch.Tensor
    prefills: list[PrefillSegment] = field(default_factory=list)
    # Decode row r's blocks are pair_blocks[decode_starts[r]:decode_starts[r + 1]], holding
    # decode_lengths[r] tokens (what the native decode attention reads).
    decode_starts: torch.Tensor | None = None
    decode_lengths: torch.Tensor | None = None
    # Cache block and slot of each new token (what write_index encodes), for native writes.
    token_blocks: torch.Tensor | None = None
    token_offsets: torch.Tensor | None = None


# Decode attention, an op of the backend (ops.TorchOps.decode_attention, chosen once at start-up):
# (queries [rows, H, D], one layer's cache, the batch, scale) -> [rows, H, D].
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, BatchMetadata, float], torch.Tensor]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, N, D]
    key: torch.Tensor,  # [1, Hkv, N, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    chatstream_batch: BatchMetadata | None = None,
    chatstream_decode: DecodeAttention | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch, decode = chatstream_batch, chatstream_decode
    if batch is None or decode is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention only runs inside chatstream's engine")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer_idx = int(module.layer_idx)  # type: ignore[arg-type]  # transformers sets it on every attention module
    return paged_attention(layer_idx, query, key, value, batch, scale, decode).unsqueeze(0), None


def paged_attention(
    layer_idx: int,
    query: torch.Tensor,  # [1, H, N, D]
    key: torch.Tensor,  # [1, Hkv, N, D]
    value: torch.Tensor,
    batch: BatchMetadata,
    scale: float,
    decode: DecodeAttention,
    kv_stored: bool = False,
    keys_transposed: bool = False,
) -> torch.Tensor:
    """Store the step's new keys and values in layer ``layer_idx``'s cache (unless the caller
    did: ``kv_stored``); return ``[N, H, D]``. The decode rows go through ``decode`` (the
    backend's op); ``keys_transposed``: the cache is in the native kernels' layout."""
    cache = batch.cache.layers[layer_idx]
    if not kv_stored:
        new_kv = torch.stack((key[0], value[0]), dim=1).to(cache.dtype)  # [Hkv, 2, N, D]
        cache.view(-1, cache.shape[-1]).index_copy_(0, batch.write_index, new_kv.flatten(0, 2))

    q = query[0].transpose(0, 1)  # [N, H, D]
    nd = batch.num_decode
    if not batch.prefills:
        return decode(q, cache, batch, scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode(q[:nd], cache, batch, scale)
    for seg in batch.prefills:
        out[seg.start : seg.end] = _prefill(query, key, value, cache, seg, scale, keys_transposed)
    return out


# PyTorch's two decode attentions: one query per sequence against its own cached blocks, ragged,
# padded only to a block. Each (row, block) pair is attended on its own, and the pairs of a row
# are merged through their log-sum-exps (as split-K flash decoding does). On CPU each pair can run
# in PyTorch's fused flash kernel, which returns the log-sum-exp too (~1.2-1.7x faster than the
# matmuls of decode_bmm, which remain for other devices). The native kernel (ops.NativeOps) does
# all of it in one pass over the cache with no gathered copy.


def decode_flash(q: torch.Tensor, cache: torch.Tensor, batch: BatchMetadata, scale: float) -> torch.Tensor:
    """Through PyTorch's CPU flash kernel (the backend picks it only where it exists)."""
    flash = _CPU_FLASH
    if flash is None:
        raise RuntimeError("this PyTorch has no CPU flash attention kernel")
    nd, num_heads, head_dim = q.shape
    num_pairs = batch.pair_blocks.shape[0]
    num_kv_heads = cache.shape[1]
    rows = batch.pair_rows
    kv = cache.index_select(0, batch.pair_blocks).to(q.dtype)  # [P, Hkv, 2, bs, D] (a 16-bit cache widened)
    # GQA: a KV head's query heads become that head's "query positions" (one token each).
    queries = q.index_select(0, rows).view(num_pairs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = batch.pair_bias.view(num_pairs, num_kv_heads, 1, -1)[:, :1]  # [P, 1, 1, bs]
    out, lse = flash(queries, kv[:, :, 0], kv[:, :, 1], 0.0, False, attn_mask=mask, scale=scale)[:2]
    lse = lse.reshape(num_pairs, num_heads).float()
    row_max = lse.new_full((nd, num_heads), float("-inf"))
    row_max.scatter_reduce_(0, rows[:, None].expand_as(lse), lse, "amax")
    weights = torch.exp(lse - row_max.index_select(0, rows))  # [P, H]
    denom = lse.new_zeros((nd, num_heads)).index_add_(0, rows, weights)
    weighted = out.reshape(num_pairs, num_heads, head_dim).float() * weights.unsqueeze(-1)
    merged = weighted.new_zeros((nd, num_heads, head_dim)).index_add_(0, rows, weighted)
    return (merged / denom.unsqueeze(-1)).to(q.dtype)


def decode_bmm(q: torch.Tensor, cache: torch.Tensor, batch: BatchMetadata, scale: float) -> torch.Tensor:
    """Scores per (row, block) pair with batched matmuls, then a softmax across each row's pairs:
    per-row max (for stability) and sum via scatter_reduce/index_add."""
    nd, num_heads, head_dim = q.shape
    num_pairs = batch.pair_blocks.shape[0]
    num_kv_heads, block_size = cache.shape[1], cache.shape[3]
    group = num_heads // num_kv_heads  # query heads sharing one KV head (GQA)
    rows = batch.pair_rows
    # Computed in float32 whatever the model dtype: bf16 scores would be too coarse for softmax.
    kv = cache.index_select(0, batch.pair_blocks).float()  # [P, Hkv, 2, bs, D]
    keys = kv[:, :, 0].flatten(0, 1)  # [P*Hkv, bs, D]
    values = kv[:, :, 1].flatten(0, 1)
    queries = q.index_select(0, rows).float().view(num_pairs * num_kv_heads, group, head_dim)
    scores = torch.baddbmm(batch.pair_bias, queries, keys.transpose(1, 2), alpha=scale)
    scores = scores.view(num_pairs, num_heads, block_size)
    pair_max = scores.amax(-1)  # [P, H]
    row_max = pair_max.new_full((nd, num_heads), float("-inf"))
    row_max.scatter_reduce_(0, rows[:, None].expand_as(pair_max), pair_max, "amax")
    weights = torch.exp(scores - row_max.index_select(0, rows).unsqueeze(-1))
    denom = pair_max.new_zeros((nd, num_heads)).index_add_(0, rows, weights.sum(-1))
    partial = torch.bmm(weights.view(-1, group, block_size), values)  # [P*Hkv, G, D]
    out = partial.new_zeros((nd, num_heads, head_dim))
    out.index_add_(0, rows, partial.view(num_pairs, num_heads, head_dim))
    return (out / denom.unsqueeze(-1)).to(q.dtype)


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    seg: PrefillSegment,
    scale: float,
    keys_transposed: bool = False,
) -> torch.Tensor:
    q = query[:, :, seg.start : seg.end]  # [1, H, n, D]
    if seg.past_blocks is None:  # the whole context is in this segment
        k = key[:, :, seg.start : seg.end]
        v = value[:, :, seg.start : seg.end]
        if cache.dtype != k.dtype:  # attend to the keys and values as the cache holds them, as later steps will
            k, v = k.to(cache.dtype).to(k.dtype), v.to(cache.dtype).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    n = seg.end - seg.start
    context = seg.num_past + n
    kv = cache.index_select(0, seg.past_blocks).to(q.dtype)  # [nb, Hkv, 2, bs, D] (a 16-bit cache widened)
    nb, hkv, _, bs, d = kv.shape
    if keys_transposed:  # the native kernels' layout
        kv = torch.stack((keys_in_order(kv[:, :, 0]), kv[:, :, 1]), dim=2)
    kv = kv.permute(2, 1, 0, 3, 4).reshape(2, 1, hkv, nb * bs, d)[:, :, :, :context]
    # Causal with an offset: query i (position num_past + i) sees keys 0..num_past + i.
    q_pos = torch.arange(seg.num_past, context, device=q.device)
    mask = torch.arange(context, device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


# The backend's decode_attention names for PyTorch's two (Backend.decode_attention; "native" is ops.NativeOps').
TORCH_DECODE: dict[str, DecodeAttention] = {"flash": decode_flash, "bmm": decode_bmm}


def cpu_flash_available() -> bool:
    return _CPU_FLASH is not None


def register() -> None:
    """Make ``ATTENTION_NAME`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
