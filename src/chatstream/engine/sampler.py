"""Per-row sampling over a batch of logits, vectorised: one set of tensor ops for all rows.

Every row carries its own temperature, top-k, top-p, repetition penalty and seed. A row is sampled
by inverting its CDF at a uniform ``u`` (``searchsorted(cumsum(probs), u)``), with ``u`` a
counter-based hash of ``(seed, step)`` (splitmix64). A row's randomness therefore depends only on
its own seed and how many tokens it has produced, never on what else shares the batch, with no
per-row generator and no Python loop over rows. (Gumbel-max would do too, but needs a hash per
vocabulary entry: ~10 extra passes over ``[B, V]``; this needs one uniform per row.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row parameters, as tensors on the logits' device."""

    temperature: torch.Tensor  # float [B]; 0 means greedy
    top_k: torch.Tensor  # int64 [B]; 0 means off
    top_p: torch.Tensor  # float [B]; 1 means off
    repetition_penalty: torch.Tensor  # float [B]; 1 means off
    seed: torch.Tensor  # int64 [B]
    step: torch.Tensor  # int64 [B], tokens generated so far
    # (row, token id) pairs of tokens already seen by rows with a repetition penalty.
    seen_rows: torch.Tensor | None = None
    seen_tokens: torch.Tensor | None = None


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Return one token id per row of ``logits`` [B, V]."""
    logits = logits.float()
    if batch.seen_rows is not None and batch.seen_tokens is not None:
        logits = _apply_repetition_penalty(logits, batch)
    greedy = logits.argmax(dim=-1)
    sampled_rows = batch.temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    temperature = torch.where(sampled_rows, batch.temperature, 1.0)
    scaled = logits / temperature[:, None]
    if bool(((batch.top_k > 0) | (batch.top_p < 1)).any()):
        scaled = _top_k_top_p(scaled, batch.top_k, batch.top_p)
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    u = _uniform(batch.seed, batch.step)
    # The first token whose CDF reaches u; zero-probability tokens can never be that first one.
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    drawn = drawn.clamp_(max=logits.shape[1] - 1)
    return torch.where(sampled_rows, drawn, greedy)


def _apply_repetition_penalty(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """HF semantics: a seen token's logit is divided by the penalty if positive, else multiplied."""
    rows, tokens = batch.seen_rows, batch.seen_tokens
    assert rows is not None and tokens is not None
    penalty = batch.repetition_penalty[rows]
    seen = logits[rows, tokens]
    logits = logits.clone()
    logits[rows, tokens] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[1])[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Drop a token once the tokens before it already cover top_p (the first one always stays).
    drop |= ((probs.cumsum(dim=-1) - probs) > top_p[:, None]) & (top_p < 1)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic, so mask off the sign copies)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser; int64 arithmetic wraps like uint64."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """A float32 in (0, 1) for every (seed, step) pair, reproducible on any device."""
    z = _mix(_mix(seed * _GOLDEN + _GOLDEN) + step * _GOLDEN)
    return (_shr(z, 40).float() + 0.5) * (1.0 / (1 << 24))
