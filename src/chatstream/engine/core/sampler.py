"""Per-row sampling over a batch of logits, vectorised: one set of tensor ops for all rows.

Every row carries its own temperature, top-k, top-p, min-p, penalties and seed. A row is sampled
by inverting its CDF, in token-id order, at a uniform ``u`` (``searchsorted(cumsum(probs), u)``),
with ``u`` a counter-based hash of ``(seed, step)`` (splitmix64). A row's randomness therefore
depends only on its own seed and how many tokens it has produced, never on what else shares the
batch, with no per-row generator and no Python loop over rows. (Gumbel-max would do too, but needs
a hash per vocabulary entry: ~10 extra passes over ``[B, V]``; this needs one uniform per row.)

Truncation (top-k, top-p, min-p) never sorts the vocabulary: the tokens any of them keeps are a
prefix of the row sorted by logit, so a partial selection of the largest ``C`` (``torch.topk``) is
enough whenever that prefix ends inside the ``C`` candidates. ``C`` is the largest top-k in the
batch, or :data:`CANDIDATES` for rows filtered by top-p/min-p alone (their probabilities are
normalised over the whole vocabulary, so the cut is exact). A row whose kept prefix might run past
its candidates (a very flat distribution) is redone over the whole vocabulary, so the result is
always the same as sorting everything.

Hooks for callers that need more than a token: ``mask`` (a grammar's allowed tokens, packed as
llguidance's bitmask: int32 ``[B, ceil(V / 32)]``, see :func:`pack_mask`) removes tokens before
anything else, greedy included; ``want_logprobs`` returns the log-probabilities of the logits after
penalties and the mask (before temperature and truncation). Both cost nothing when unused. The
native kernel applies the mask itself, to a copy of each constrained row only, so a constrained row
costs about what a free one does; PyTorch's path unpacks it for the constrained rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sampling_native import SamplingKernels

# Candidates taken for rows truncated by top-p/min-p without a top-k: a chat model's top-p 0.9
# nucleus is almost always far smaller; a row whose nucleus is larger is redone over the vocabulary.
CANDIDATES = 1024


@dataclass
class SamplingBatch:
    """Per-row parameters, as tensors on the logits' device."""

    temperature: torch.Tensor  # float [B]; 0 means greedy
    top_k: torch.Tensor  # int64 [B]; 0 means off
    top_p: torch.Tensor  # float [B]; 1 means off
    repetition_penalty: torch.Tensor  # float [B]; 1 means off
    seed: torch.Tensor  # int64 [B]
    step: torch.Tensor  # int64 [B], tokens generated so far
    # (row, token id) pairs of tokens already seen (prompt and reply) by rows with a repetition penalty.
    seen_rows: torch.Tensor | None = None
    seen_tokens: torch.Tensor | None = None
    min_p: torch.Tensor | None = None  # float [B]; 0 means off; None when no row uses it
    presence_penalty: torch.Tensor | None = None  # float [B]; None when no row uses either penalty
    frequency_penalty: torch.Tensor | None = None  # float [B]
    # (row, token id) pairs, one per generated token, of rows with a presence/frequency penalty.
    output_rows: torch.Tensor | None = None
    output_tokens: torch.Tensor | None = None


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # int64 [B]
    # float [B, V] log-softmax of the logits after penalties and mask; only with want_logprobs.
    logprobs: torch.Tensor | None = None


def sample(
    logits: torch.Tensor, batch: SamplingBatch, mask: torch.Tensor | None = None, want_logprobs: bool = False,
    kernels: SamplingKernels | None = None,
) -> SampleOutput:
    """Sample one token id per row of ``logits`` [B, V]. ``kernels``: draw CPU rows through the
    native kernel (:mod:`.sampling_native`: the same tokens, one pass over each row); rows it
    cannot settle exactly, and every row without it, go through PyTorch's operators."""
    logits = logits.float()
    native = kernels is not None and logits.device.type == "cpu" and logits.stride(1) == 1
    # The native kernel masks a copy of each constrained row itself, unless the masked logits are
    # needed here (log-probabilities). Masking commutes with the penalties (-inf stays -inf).
    mask_inside = native and mask is not None and not want_logprobs
    if mask is not None and not mask_inside:
        logits = _apply_mask(logits, mask)
    penalised = batch.seen_rows is not None and batch.seen_tokens is not None
    # The native kernel applies the repetition penalty itself, on a copy of each penalised row only,
    # unless the penalised logits are needed here (log-probabilities, or penalties applied after it).
    penalty_inside = native and penalised and not want_logprobs and batch.output_rows is None
    if penalised and not penalty_inside:
        logits = _apply_repetition_penalty(logits, batch)
    if batch.output_rows is not None and batch.output_tokens is not None:
        logits = _apply_presence_frequency(logits, batch)
    logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
    params = (batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seed, batch.step)
    if kernels is None or not native:
        return SampleOutput(_draw_tokens(logits, *params), logprobs)
    penalty = None
    if penalty_inside:
        assert batch.seen_rows is not None and batch.seen_tokens is not None
        penalty = (batch.repetition_penalty, batch.seen_rows, batch.seen_tokens)
    tokens = kernels.sample(logits, *params, CANDIDATES, repetition_penalty=penalty,
                            allowed=mask if mask_inside else None)
    redo = (tokens < 0).nonzero().squeeze(1)
    if redo.numel():  # a top-k past the candidates, or a nucleus reaching past them
        if penalty_inside:
            logits = _apply_repetition_penalty(logits, batch)
        min_p = None if batch.min_p is None else batch.min_p[redo]
        again = _apply_mask(logits[redo], mask[redo]) if mask is not None and mask_inside else logits[redo]
        tokens[redo] = _draw_tokens(again, batch.temperature[redo], batch.top_k[redo], batch.top_p[redo], min_p,
                                    batch.seed[redo], batch.step[redo])
    return SampleOutput(tokens, logprobs)


def _draw_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor | None, seed: torch.Tensor, step: torch.Tensor,
) -> torch.Tensor:
    """The PyTorch sampler: one token per row of ``logits`` (after the mask and penalties)."""
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return logits.argmax(dim=-1)
    tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    if not bool(sampled_rows.all()):
        greedy = (~sampled_rows).nonzero().squeeze(1)
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    vocab = logits.shape[1]
    top_k = torch.where((top_k > 0) & (top_k < vocab), top_k, 0)
    min_p = min_p if min_p is not None else torch.zeros_like(top_p)
    filtered = sampled_rows & ((top_k > 0) | (top_p < 1) | (min_p > 0))
    plain = sampled_rows & ~filtered
    u = _uniform(seed, step)
    temperature = temperature[:, None]
    if bool(plain.any()):  # temperature only: the whole vocabulary is the distribution
        rows = plain.nonzero().squeeze(1)
        scaled = _rows(logits, rows) / temperature[rows]
        tokens[rows] = _draw(scaled.softmax(dim=-1), torch.arange(vocab, device=logits.device)[None, :], u[rows])
    if bool(filtered.any()):
        rows = filtered.nonzero().squeeze(1)
        scaled = _rows(logits, rows) / temperature[rows]
        k, p, m = top_k[rows], top_p[rows], min_p[rows]
        need = torch.where(k > 0, k.clamp(max=CANDIDATES), CANDIDATES)
        count = min(vocab, int(need.max()))
        drawn, spilled = _truncated_draw(scaled, k, p, m, u[rows], count)
        tokens[rows] = drawn
        if count < vocab and bool(spilled.any()):  # the kept prefix may run past the candidates
            redo = spilled.nonzero().squeeze(1)
            tokens[rows[redo]] = _truncated_draw(scaled[redo], k[redo], p[redo], m[redo], u[rows[redo]], vocab)[0]
    return tokens


def _truncated_draw(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from the ``count`` largest logits of each row after top-k, top-p and min-p.

    Returns the tokens and, per row, whether its last candidate was kept (then tokens past the
    candidates might belong to the kept set too, and the draw is only right if ``count`` is the
    whole vocabulary).
    """
    values, ids = scaled.topk(count, dim=-1)  # sorted, largest first
    rank = torch.arange(count, device=scaled.device)[None, :]
    drop = (rank >= top_k[:, None]) & (top_k > 0)[:, None]
    # top-p's probabilities are those after top-k: over the top-k when there is one, else the vocabulary.
    total = values.masked_fill(drop, float("-inf")).logsumexp(dim=-1, keepdim=True)
    if bool((top_k == 0).any()):
        total = torch.where((top_k > 0)[:, None], total, scaled.logsumexp(dim=-1, keepdim=True))
    probs = (values - total).exp().masked_fill(drop, 0.0)
    # Drop a token once the tokens before it already cover top_p (the first one always stays).
    drop |= ((probs.cumsum(dim=-1) - probs) > top_p[:, None]) & (top_p < 1)[:, None]
    drop |= probs < (min_p * probs[:, 0])[:, None]
    # A top-k larger than the candidates also normalises over tokens past them: never exact here.
    spilled = (~drop[:, -1] & (top_k == 0)) | (top_k > count)
    # Invert the CDF in token-id order, as over the whole vocabulary: the same u picks the same token.
    ids, order = ids.sort(dim=-1)
    kept = values.masked_fill(drop, float("-inf")).gather(1, order)
    return _draw(kept.softmax(dim=-1), ids, u), spilled


def pack_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool ``[B, V]`` (True = allowed) -> the packed int32 ``[B, ceil(V / 32)]`` that ``mask``
    takes: bit ``i % 32`` of word ``i // 32`` is token ``i``, as llguidance fills it."""
    rows, vocab = allowed.shape
    bits = torch.zeros(rows, -(-vocab // 32) * 32, dtype=torch.int64, device=allowed.device)
    bits[:, :vocab] = allowed.long()
    words = (bits.view(rows, -1, 32) << torch.arange(32, device=allowed.device)).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logits`` with the tokens ``mask`` (packed) forbids at -inf, unpacked for constrained rows only."""
    mask = mask.to(logits.device)
    rows = (mask != -1).any(dim=1).nonzero().squeeze(1)
    vocab = logits.shape[1]
    if vocab > mask.shape[1] * 32:  # tokens past the mask's words are never allowed
        rows = torch.arange(logits.shape[0], device=logits.device)
    if not rows.numel():
        return logits
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask[rows, :, None] >> shifts) & 1).view(rows.shape[0], -1).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(rows.shape[0], vocab - allowed.shape[1])], dim=1)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab], float("-inf"))
    return logits


def _rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``logits[rows]``, without the copy when that is every row (the usual batch: all alike)."""
    return logits if rows.shape[0] == logits.shape[0] else logits[rows]


def _draw(probs: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The id of the first entry whose CDF reaches ``u``; zero-probability entries never are."""
    cdf = probs.cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=probs.shape[1] - 1)
    return ids.expand(probs.shape[0], -1).gather(1, drawn).squeeze(1)


def _apply_repetition_penalty(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """HF semantics: a seen token's logit is divided by the penalty if positive, else multiplied."""
    rows, tokens = batch.seen_rows, batch.seen_tokens
    assert rows is not None and tokens is not None
    penalty = batch.repetition_penalty[rows]
    seen = logits[rows, tokens]
    logits = logits.clone()
    logits[rows, tokens] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def _apply_presence_frequency(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI semantics over the reply so far: ``logit -= count * frequency + (count > 0) * presence``."""
    rows, tokens = batch.output_rows, batch.output_tokens
    assert rows is not None and tokens is not None
    assert batch.presence_penalty is not None and batch.frequency_penalty is not None
    vocab = logits.shape[1]
    logits = logits.clone()
    flat = logits.view(-1)
    flat.index_put_((rows * vocab + tokens,), -batch.frequency_penalty[rows], accumulate=True)
    present = torch.unique(rows * vocab + tokens)
    flat.index_put_((present,), -batch.presence_penalty[torch.div(present, vocab, rounding_mode="floor")],
                    accumulate=True)
    return logits


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
