"""The batched sampler: the same tokens as the full-sort sampler it replaced, per-row randomness, min-p,
presence/frequency penalties, and the mask/logprobs hooks."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from chatstream.engine.core import sampling_native
from chatstream.engine.core.sampler import CANDIDATES, SampleOutput, SamplingBatch, _uniform, pack_mask, sample

Sample = Callable[..., SampleOutput]


@pytest.fixture(params=["torch", "native"])
def draw(request: pytest.FixtureRequest) -> Sample:
    """The sampler through PyTorch's operators, and through the native kernel (which must build here)."""
    return functools.partial(sample, kernels=sampling_native.load(request.param))

VOCAB = 8192  # above CANDIDATES, small enough for the full-sort reference to be quick


def old_sample(logits: torch.Tensor, batch: SamplingBatch, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """The sampler before the partial selection (main f034501), kept as the reference: it sorts the
    whole vocabulary of every row. ``min_p`` is the one addition: a mask on the sorted probabilities."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled_rows = batch.temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    temperature = torch.where(sampled_rows, batch.temperature, 1.0)
    scaled = logits / temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[1])[None, :]
    k = torch.where(batch.top_k > 0, batch.top_k, scaled.shape[1])[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= ((probs.cumsum(dim=-1) - probs) > batch.top_p[:, None]) & (batch.top_p < 1)[:, None]
    if min_p is not None:
        drop |= probs < (min_p * probs[:, 0])[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    u = _uniform(batch.seed, batch.step)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp_(max=logits.shape[1] - 1)
    return torch.where(sampled_rows, drawn, greedy)


def make_batch(rows: list[tuple[float, int, float]], step: int = 0, seed0: int = 0) -> SamplingBatch:
    n = len(rows)
    return SamplingBatch(
        temperature=torch.tensor([r[0] for r in rows]),
        top_k=torch.tensor([r[1] for r in rows], dtype=torch.long),
        top_p=torch.tensor([r[2] for r in rows]),
        repetition_penalty=torch.ones(n),
        seed=torch.arange(seed0, seed0 + n, dtype=torch.long) * 7919 - 3,
        step=torch.full((n,), step, dtype=torch.long),
    )


def chat_like_logits(rows: int, generator: torch.Generator, spread: float = 4.0) -> torch.Tensor:
    """A long tail and a few likely tokens, like a chat model's logits (no exact ties)."""
    logits = torch.randn(rows, VOCAB, generator=generator) * spread
    top = torch.randint(0, VOCAB, (rows, 8), generator=generator)
    return logits.scatter_add(1, top, torch.rand(rows, 8, generator=generator) * 10 + 10)


# (temperature, top_k, top_p): greedy, temperature alone, each filter alone, the chat defaults,
# a top-k past the candidates, a top-k past the vocabulary, a tiny top_p, a nucleus past the candidates.
ROWS = [
    (0.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 50, 1.0), (0.7, 0, 0.9), (0.7, 50, 0.9), (1.0, 40, 0.95),
    (1.3, 2000, 0.9), (0.8, VOCAB + 5, 0.8), (100.0, 2**31 - 1, 1e-9), (5.0, 0, 0.99), (1.0, 1, 1.0),
]


def test_same_tokens_as_the_full_sort_sampler_for_every_parameter_mix(draw: Sample) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = ROWS * 2
    mismatches = 0
    for step in range(5):
        logits = chat_like_logits(len(rows), generator, spread=1.0 + step)
        batch = make_batch(rows, step=step, seed0=step)
        new, old = draw(logits, batch).tokens, old_sample(logits, batch)
        mismatches += int((new != old).sum())
    assert mismatches == 0


def test_a_nucleus_larger_than_the_candidates_is_still_exact(draw: Sample) -> None:
    """Flat logits: top-p 0.9 keeps ~90% of the vocabulary, far past the candidate set."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, VOCAB, generator=generator) * 0.1
    rows = [(1.0, 0, 0.9)] * 4 + [(1.0, 0, 0.5)] * 4
    for step in range(4):
        batch = make_batch(rows, step=step)
        tokens = draw(logits, batch).tokens
        assert torch.equal(tokens, old_sample(logits, batch))
    ranks = (logits > logits.gather(1, tokens[:, None])).sum(dim=1)
    assert int(ranks.max()) >= CANDIDATES  # the draws do reach past the candidates


def test_a_rows_tokens_depend_only_on_its_own_seed(draw: Sample) -> None:
    generator = torch.Generator().manual_seed(2)
    logits = chat_like_logits(len(ROWS), generator)
    batch = make_batch(ROWS, step=3)
    together = draw(logits, batch).tokens
    for row in range(len(ROWS)):
        alone = make_batch([ROWS[row]], step=3)
        alone.seed = batch.seed[row : row + 1]
        assert int(draw(logits[row : row + 1], alone).tokens[0]) == int(together[row])


def test_min_p_keeps_only_tokens_close_to_the_most_likely_one(draw: Sample) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(16, VOCAB, generator=generator) * 2.0
    rows = [(1.0, 0, 1.0)] * 8 + [(1.0, 50, 0.95)] * 8
    min_p = torch.tensor([0.05, 0.2, 0.5, 0.9, 0.001, 0.0, 1.0, 0.1] * 2)
    for step in range(8):
        batch = make_batch(rows, step=step)
        batch.min_p = min_p
        tokens = draw(logits, batch).tokens
        assert torch.equal(tokens, old_sample(logits, batch, min_p))
        probs = logits.softmax(dim=-1)
        chosen = probs.gather(1, tokens[:, None]).squeeze(1)
        assert bool((chosen >= min_p * probs.max(dim=-1).values * (1 - 1e-5)).all())
    always_top = make_batch([(1.0, 0, 1.0)])
    always_top.min_p = torch.tensor([1.0])
    assert int(draw(logits[:1], always_top).tokens[0]) == int(logits[0].argmax())


def test_presence_and_frequency_penalties_follow_openai(draw: Sample) -> None:
    logits = torch.zeros(3, 10)
    logits[:, 4] = 1.0  # the favourite, 1.0 ahead of the rest
    batch = make_batch([(0.0, 0, 1.0)] * 3)
    batch.presence_penalty = torch.tensor([0.0, 1.1, 0.0])
    batch.frequency_penalty = torch.tensor([0.3, 0.0, 0.6])
    # Row 0 said 4 three times (0.9 off: still ahead), row 1 once (1.1 off), row 2 twice (1.2 off).
    batch.output_rows = torch.tensor([0, 0, 0, 1, 2, 2])
    batch.output_tokens = torch.tensor([4, 4, 4, 4, 4, 4])
    out = draw(logits, batch, want_logprobs=True)
    assert out.tokens.tolist() == [4, 0, 0]
    assert out.logprobs is not None
    expected = torch.stack([logits[0] - 0.9 * (torch.arange(10) == 4), logits[1] - 1.1 * (torch.arange(10) == 4),
                            logits[2] - 1.2 * (torch.arange(10) == 4)]).log_softmax(dim=-1)
    assert torch.allclose(out.logprobs, expected, atol=1e-6)
    negative = make_batch([(0.0, 0, 1.0)])
    negative.presence_penalty, negative.frequency_penalty = torch.tensor([0.0]), torch.tensor([-2.0])
    negative.output_rows, negative.output_tokens = torch.tensor([0]), torch.tensor([7])
    assert int(draw(logits[:1], negative).tokens[0]) == 7  # a negative penalty favours the repeat


def test_a_mask_removes_tokens_from_greedy_and_sampled_rows_alike(draw: Sample) -> None:
    generator = torch.Generator().manual_seed(4)
    logits = chat_like_logits(len(ROWS), generator)
    original = logits.clone()
    allowed = torch.rand(len(ROWS), VOCAB, generator=generator) < 0.3
    allowed[1] = True  # a free row among constrained ones
    allowed[2, :] = False
    allowed[2, [5, VOCAB - 1]] = True  # a grammar that allows two tokens, one in the last word
    for step in range(4):
        batch = make_batch(ROWS, step=step)
        tokens = draw(logits, batch, mask=pack_mask(allowed)).tokens
        assert bool(allowed.gather(1, tokens[:, None]).all())
        assert torch.equal(tokens, old_sample(logits.masked_fill(~allowed, float("-inf")), batch))
        out = draw(logits, batch, mask=pack_mask(allowed), want_logprobs=True)  # masked before the log-softmax
        assert torch.equal(out.tokens, tokens)
        assert out.logprobs is not None and torch.equal(out.logprobs.isinf(), ~allowed)
    assert torch.equal(logits, original)  # the caller's logits are never written
    assert draw(logits, make_batch(ROWS)).logprobs is None  # nothing extra unless asked


def test_pack_mask_is_llguidances_bitmask() -> None:
    """Bit i % 32 of word i // 32 is token i, as llguidance fills it (sign bit included); the
    words past a vocabulary that is not a multiple of 32 stay clear."""
    allowed = torch.zeros(2, 70, dtype=torch.bool)
    allowed[0, [0, 31, 32, 69]] = True
    allowed[1] = True
    assert pack_mask(allowed).tolist() == [[1 - 2**32 + 2**31, 1, 1 << 5], [-1, -1, (1 << 6) - 1]]


def test_masked_rows_draw_the_same_tokens_natively_and_through_pytorch() -> None:
    """A grammar's rows at the default model's vocabulary, beside free rows, with the repetition
    penalty on some: the native kernel, which masks a copy of each constrained row itself, draws
    what PyTorch's operators draw after unpacking the mask."""
    native = sampling_native.load("native")
    generator = torch.Generator().manual_seed(8)
    vocab = 49152
    rows = [(0.7, 0, 0.9), (0.0, 0, 1.0), (0.7, 50, 0.9), (1.0, 0, 1.0)] * 4
    draws = mismatches = 0
    for step in range(8):
        logits = torch.randn(len(rows), vocab, generator=generator) * (1.0 + step % 4)
        logits[:, torch.randint(0, vocab, (6,), generator=generator)] += 8.0
        # Rows 0-7 constrained (a JSON grammar's masks range from a few tokens to most of the vocabulary).
        allowed = torch.ones(len(rows), vocab, dtype=torch.bool)
        allowed[:8] = torch.rand(8, vocab, generator=generator) < torch.tensor([0.0005, 0.01, 0.3, 0.9] * 2)[:, None]
        allowed[:8, step] = True
        batch = make_batch(rows, step=step, seed0=50 * step)
        batch.repetition_penalty = torch.tensor([1.3, 1.0] * 8)
        batch.seen_rows = torch.arange(len(rows)).repeat_interleave(4)
        batch.seen_tokens = logits.topk(4, dim=-1).indices.flatten()
        mask = pack_mask(allowed)
        fast, slow = sample(logits, batch, mask, kernels=native).tokens, sample(logits, batch, mask).tokens
        assert bool(allowed.gather(1, fast[:, None]).all())
        mismatches += int((fast != slow).sum())
        draws += len(rows)
    assert (draws, mismatches) == (128, 0)


def test_native_and_torch_draw_the_same_tokens_at_the_models_vocabulary() -> None:
    """16 rows over the default model's 49,152 tokens, the chat defaults among other mixes, many
    steps: the native kernel draws exactly what PyTorch's operators draw."""
    native = sampling_native.load("native")
    generator = torch.Generator().manual_seed(5)
    rows = [(0.7, 50, 0.9)] * 8 + [(0.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 0, 0.9), (1.0, 40, 1.0),
                                   (0.6, 20, 0.8), (2.0, 100, 0.95), (0.7, 50, 1.0), (1.0, 0, 0.5)]
    draws = mismatches = 0
    for step in range(12):
        logits = torch.randn(len(rows), 49152, generator=generator) * (1.0 + step % 4)
        logits[:, torch.randint(0, 49152, (6,), generator=generator)] += 8.0
        batch = make_batch(rows, step=step, seed0=100 * step)
        batch.min_p = torch.tensor([0.0, 0.05] * 8)
        fast, slow = sample(logits, batch, kernels=native).tokens, sample(logits, batch).tokens
        mismatches += int((fast != slow).sum())
        draws += len(rows)
    assert (draws, mismatches) == (192, 0)


def test_greedy_picks_the_first_of_tied_maxima(draw: Sample) -> None:
    logits = torch.zeros(3, 100)
    logits[0, [7, 40, 99]] = 5.0
    logits[1, [63, 64]] = 1.0  # both in one block of 16
    logits[2] = -1.0  # every token ties
    assert draw(logits, make_batch([(0.0, 0, 1.0)] * 3)).tokens.tolist() == [7, 63, 0]


def test_the_repetition_penalty_gives_the_same_tokens_on_every_path(draw: Sample) -> None:
    """HF's penalty over (row, token) pairs: given unsorted, with repeats, for some rows only; the
    native kernel applies it to a copy of each penalised row, never to the caller's logits."""
    generator = torch.Generator().manual_seed(6)
    rows = [(0.0, 0, 1.0), (0.7, 50, 0.9), (0.7, 0, 0.9), (1.0, 0, 1.0)] * 2
    for step in range(6):
        logits = chat_like_logits(len(rows), generator, spread=1.0 + step)
        original = logits.clone()
        batch = make_batch(rows, step=step, seed0=step)
        batch.repetition_penalty = torch.tensor([1.3, 1.05, 2.0, 0.8, 1.0, 1.2, 1.5, 1.1])
        # Each row has seen its 8 most likely tokens (and some twice): the penalty must move the draw.
        top = logits.topk(8, dim=-1).indices
        pairs = [(row, int(t)) for row in range(len(rows)) for t in top[row]] + [(3, int(top[3, 0])), (0, int(top[0, 1]))]
        pairs.reverse()
        batch.seen_rows = torch.tensor([r for r, _ in pairs])
        batch.seen_tokens = torch.tensor([t for _, t in pairs])
        seen = logits[batch.seen_rows, batch.seen_tokens]
        penalised = logits.clone()
        penalty = batch.repetition_penalty[batch.seen_rows]
        penalised[batch.seen_rows, batch.seen_tokens] = torch.where(seen > 0, seen / penalty, seen * penalty)
        expected = old_sample(penalised, batch)
        assert torch.equal(draw(logits, batch).tokens, expected)
        out = draw(logits, batch, want_logprobs=True)  # the penalised logits are needed here: applied first
        assert torch.equal(out.tokens, expected)
        assert out.logprobs is not None and torch.allclose(out.logprobs, penalised.log_softmax(dim=-1))
        assert torch.equal(logits, original)
    assert not torch.equal(old_sample(penalised, batch), old_sample(logits, batch))
