"""Time one sampling step on a batch of logits: greedy, the batched sampler (PyTorch's operators and the native kernel), and the full-sort sampler it replaced; and with a grammar's mask on every row.

    .venv/bin/python -m benchmarks.sampler [--batch 16] [--vocab 49152] [--rounds 5] [--iters 20]

Each round times every variant ``--iters`` times, interleaved (A/B/C, A/B/C, ...), and reports the
median of the per-round medians, so load from other processes hits every variant alike. The default
parameters are a chat UI's: temperature 0.7, top-k 50, top-p 0.9, a repetition penalty of 1.05 over
a 300-token context, as chatstream's ``/chat_stream`` defaults send. The masked variants constrain
every row with a grammar's packed mask (half the vocabulary allowed): inside the native kernel, and
as the engine applied it before (llguidance's ``apply_token_bitmask_inplace`` on the constrained
rows, then the native kernel).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from chatstream.engine.core import sampling_native
from chatstream.engine.core.sampler import SamplingBatch, _uniform, pack_mask, sample


def full_sort_sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The sampler of main f034501: sorts the whole vocabulary of every row (the baseline)."""
    logits = logits.float()
    if batch.seen_rows is not None and batch.seen_tokens is not None:
        penalty = batch.repetition_penalty[batch.seen_rows]
        seen = logits[batch.seen_rows, batch.seen_tokens]
        logits = logits.clone()
        logits[batch.seen_rows, batch.seen_tokens] = torch.where(seen > 0, seen / penalty, seen * penalty)
    greedy = logits.argmax(dim=-1)
    scaled = logits / batch.temperature[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[1])[None, :]
    drop = rank >= torch.where(batch.top_k > 0, batch.top_k, scaled.shape[1])[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= ((probs.cumsum(dim=-1) - probs) > batch.top_p[:, None]) & (batch.top_p < 1)[:, None]
    scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    u = _uniform(batch.seed, batch.step)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp_(max=logits.shape[1] - 1)
    return torch.where(batch.temperature > 0, drawn, greedy)


def make_batch(rows: int, temperature: float, top_k: int, top_p: float, penalty: float, context: int) -> SamplingBatch:
    batch = SamplingBatch(
        temperature=torch.full((rows,), temperature), top_k=torch.full((rows,), top_k, dtype=torch.long),
        top_p=torch.full((rows,), top_p), repetition_penalty=torch.full((rows,), penalty),
        seed=torch.arange(rows, dtype=torch.long), step=torch.zeros(rows, dtype=torch.long),
    )
    if penalty != 1.0:
        batch.seen_rows = torch.arange(rows).repeat_interleave(context)
        batch.seen_tokens = torch.randint(0, 32000, (rows * context,))
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.05)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    opts = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(opts.batch, opts.vocab, generator=generator) * 3
    batch = make_batch(opts.batch, opts.temperature, opts.top_k, opts.top_p, opts.repetition_penalty, opts.context)
    greedy = make_batch(opts.batch, 0.0, 0, 1.0, 1.0, 0)
    native = sampling_native.load("native")
    mask = pack_mask(torch.rand(opts.batch, opts.vocab, generator=generator) < 0.5)

    def mask_then_sample() -> object:  # the engine's grammar step before the mask moved into the kernel
        import llguidance.torch as llg_torch

        index = torch.arange(opts.batch)
        constrained = logits.index_select(0, index)
        llg_torch.apply_token_bitmask_inplace(constrained, mask)
        masked = logits.clone()
        masked.index_copy_(0, index, constrained)
        return sample(masked, batch, kernels=native)

    variants: dict[str, Callable[[], object]] = {
        "greedy (argmax)": lambda: sample(logits, greedy),
        "greedy, native": lambda: sample(logits, greedy, kernels=native),
        "sampler": lambda: sample(logits, batch),
        "sampler, native": lambda: sample(logits, batch, kernels=native),
        "full-sort sampler (before)": lambda: full_sort_sample(logits, batch),
        "masked, native": lambda: sample(logits, batch, mask, kernels=native),
        "masked, torch apply + native": mask_then_sample,
    }
    assert torch.equal(sample(logits, batch).tokens, full_sort_sample(logits, batch))
    assert torch.equal(sample(logits, batch, kernels=native).tokens, full_sort_sample(logits, batch))
    assert torch.equal(sample(logits, batch, mask, kernels=native).tokens, mask_then_sample().tokens)  # type: ignore[attr-defined]
    medians: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(opts.rounds):
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(opts.iters):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        for name in variants:
            medians[name].append(statistics.median(times[name]))
    print(f"[{opts.batch}, {opts.vocab}] logits, temperature {opts.temperature}, top_k {opts.top_k}, "
          f"top_p {opts.top_p}, repetition_penalty {opts.repetition_penalty} over {opts.context} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in variants:
        print(f"  {name:28s} {statistics.median(medians[name]) * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
