"""Time one engine decode step at batch 1/16/32: float32 vs int8 linear layers, transformers' forward vs the fused one, native kernels vs PyTorch's operators.

    .venv/bin/python -m benchmarks.step_time [--batches 1,16,32] [--steps 10] [--context 128] [--sampling-only | --lanes-only]
    .venv/bin/python -m benchmarks.step_time --kv-only [--context 1024]   # KV-cache dtypes, native and torch ops

Every sequence has a ``--context``-token prompt already prefilled; the figure is the fastest of
``--steps`` decode steps over ``--rounds`` interleaved rounds (one token per sequence, the whole forward with the paged
attention). Also prints the mean per-token NLL of a fixed text for each variant, the quality
side of the trade, and a second table: the engine default's step with greedy, chat sampling and the
full-sort sampler it replaced. Absolute times drift on a shared machine: compare variants within one run.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from chatstream.engine.core.block_manager import BlockManager
from chatstream.engine.core.sampler import sample
from chatstream.engine.core.scheduler import Scheduler
from chatstream.engine.core.sequence import Sequence
from chatstream.engine.model.runner import ModelRunner
from chatstream.engine.quant import int8 as quantization
from chatstream.engine.sampling_params import SamplingParams
from chatstream.model_loader import load_model

from .sampler import full_sort_sample, make_batch

TEXT = (
    "The sun is the star at the centre of the Solar System. It is a massive, nearly perfect sphere of hot "
    "plasma, heated to incandescence by nuclear fusion reactions in its core, radiating the energy from its "
    "surface mainly as visible light and infrared radiation. It is by far the most important source of "
    "energy for life on Earth."
)


def decode_step_ms(
    model: Any, batch: int, context: int, steps: int, fused: bool = True, kernels: str = "auto",
    sampler: Callable[[torch.Tensor], Any] | None = None, lanes: int = 1, cpu: list[float] | None = None, kv_cache_dtype: str = "auto",
) -> float:
    """The fastest decode step; with ``sampler``, each step's logits are also sampled, inside the timing
    (in every lane, each over its own rows, as the engine does). ``cpu`` receives each step's process CPU time."""
    blocks = BlockManager(batch * (context // 16 + steps // 16 + 2), 16, enable_prefix_caching=False)
    scheduler = Scheduler(blocks, max_num_seqs=batch, max_num_batched_tokens=batch * context)
    runner = ModelRunner(model, blocks, fused=fused, kernels=kernels, lanes=lanes, kv_cache_dtype=kv_cache_dtype)
    try:
        for i in range(batch):
            prompt = [(7 * i + j) % 1000 + 100 for j in range(context)]
            scheduler.add(Sequence(str(i), prompt, SamplingParams(), 0, None, None, None))  # type: ignore[arg-type]
        times = []
        with torch.inference_mode():
            runner.execute(scheduler.schedule().chunks)  # prefill every sequence
            for _ in range(steps + 2):
                for seq in scheduler.running:
                    seq.token_ids.append(42)
                chunks = scheduler.schedule().chunks
                start, cpu_start = time.perf_counter(), time.process_time()
                _, logits = runner.execute(chunks)
                if sampler is not None:
                    bounds = [batch * i // runner.lanes for i in range(runner.lanes + 1)] if batch >= 8 else [0, batch]
                    runner.map_lanes(lambda span, rows=logits: sampler(rows[span[0] : span[1]]), list(zip(bounds, bounds[1:])))
                times.append(time.perf_counter() - start)
                if cpu is not None:
                    cpu.append(time.process_time() - cpu_start)
        return min(times[2:]) * 1e3
    finally:
        runner.close()


def mean_nll(model: Any, tokenizer: Any) -> float:
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sampling-only", action="store_true", help="only the table of samplers")
    parser.add_argument("--lanes-only", action="store_true",
                        help="only the table of forward lanes: the engine default's step in 1 lane vs 2")
    parser.add_argument("--kv-only", action="store_true", help="only the table of KV-cache dtypes")
    opts = parser.parse_args()
    batches = [int(b) for b in opts.batches.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"context {opts.context}, best of {opts.steps} decode steps x {opts.rounds} rounds")
    # label: (layers kept float, None = all float; fused forward; kernels)
    variants: dict[str, tuple[tuple[str, ...] | None, bool, str]] = {
        "float32, transformers forward": (None, False, "torch"),
        "float32, fused forward": (None, True, "torch"),
        "float32, fused forward, native kernels": (None, True, "native"),
        "int8, transformers forward": ((), False, "torch"),
        "int8 everywhere, fused forward": ((), True, "torch"),
        "int8 everywhere, fused forward, native kernels (engine default)": ((), True, "native"),
        "int8, down_proj float, fused forward, native kernels": (("down_proj",), True, "native"),
        "int8, lm_head float, fused forward, native kernels": (("lm_head",), True, "native"),
    }
    if opts.lanes_only:
        model, _ = load_model()
        quantization.quantize_linears_int8(model)
        lanes_table(model, batches, opts)
        return
    if opts.kv_only:
        model, _ = load_model()
        quantization.quantize_linears_int8(model)
        kv_table(model, batches, opts)
        return
    if opts.sampling_only:
        model, _ = load_model()
        quantization.quantize_linears_int8(model)
        sampling_table(model, batches, opts)
        return
    models = {}
    for label, (keep, _, _) in variants.items():
        model, tokenizer = load_model(quantized=False)  # float32; GGUF blocks: benchmarks.gguf
        if keep is not None:
            quantization._KEEP_FLOAT = keep  # a benchmark-only override, to show why the default keeps them
            quantization.quantize_linears_int8(model)
        models[label] = model
    # Rounds interleave the variants, and the best of each is kept: other load on a shared machine
    # only ever adds time.
    best: dict[tuple[str, int], float] = {}
    for _ in range(opts.rounds):
        for b in batches:
            for label, model in models.items():
                _, fused, kernels = variants[label]
                ms = decode_step_ms(model, b, opts.context, opts.steps, fused=fused, kernels=kernels)
                best[label, b] = min(best.get((label, b), ms), ms)
    print("| variant | " + " | ".join(f"batch {b} (ms)" for b in batches) + " | mean NLL (nats) |")
    print("|---|" + "---|" * len(batches) + "---|")
    for label, model in models.items():
        row = [f"{best[label, b]:.1f}" for b in batches]
        print(f"| {label} | " + " | ".join(row) + f" | {mean_nll(model, tokenizer):.3f} |", flush=True)
    sampling_table(models["int8 everywhere, fused forward, native kernels (engine default)"], batches, opts)


def sampling_table(model: Any, batches: list[int], opts: argparse.Namespace) -> None:
    """The engine default's decode step with each sampler: what a chat UI's parameters cost per step."""
    def samplers(b: int) -> dict[str, Callable[[torch.Tensor], Any] | None]:
        chat = make_batch(b, 0.7, 50, 0.9, 1.05, opts.context)
        greedy = make_batch(b, 0.0, 0, 1.0, 1.0, 0)
        return {"forward only": None, "+ greedy": lambda logits: sample(logits, greedy),
                "+ chat sampling (T 0.7, top-k 50, top-p 0.9, rep 1.05)": lambda logits: sample(logits, chat),
                "+ chat sampling, full-sort sampler (before)": lambda logits: full_sort_sample(logits, chat)}
    best: dict[tuple[str, int], float] = {}
    for _ in range(opts.rounds):
        for b in batches:
            for label, sampler in samplers(b).items():
                ms = decode_step_ms(model, b, opts.context, opts.steps, sampler=sampler)
                best[label, b] = min(best.get((label, b), ms), ms)
    print("\n| decode step, engine default | " + " | ".join(f"batch {b} (ms)" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for label in samplers(1):
        print(f"| {label} | " + " | ".join(f"{best[label, b]:.1f}" for b in batches) + " |", flush=True)

def lanes_table(model: Any, batches: list[int], opts: argparse.Namespace) -> None:
    """The engine default's decode step with chat sampling, its batch in one forward lane vs two
    (wall time: the fastest step; CPU time: the process's, mean per step, both lanes together).
    torch runs on the engine's default threads, the usable cores but one."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    best: dict[tuple[int, int], float] = {}
    cpu: dict[tuple[int, int], list[float]] = {}
    for _ in range(opts.rounds):
        for b in batches:
            chat = make_batch(b, 0.7, 50, 0.9, 1.0, 0)
            for lanes in (1, 2):
                def sampler(logits: torch.Tensor, chat: Any = chat) -> Any:
                    rows = logits.shape[0]
                    part = make_batch(rows, 0.7, 50, 0.9, 1.0, 0) if rows != chat.temperature.shape[0] else chat
                    return sample(logits, part)
                ms = decode_step_ms(model, b, opts.context, opts.steps, sampler=sampler, lanes=lanes,
                                    cpu=cpu.setdefault((lanes, b), []))
                best[lanes, b] = min(best.get((lanes, b), ms), ms)
    print("\n| decode step + chat sampling, engine default | " + " | ".join(f"batch {b}: wall / CPU ms" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for lanes in (1, 2):
        cells = [f"{best[lanes, b]:.1f} / {1e3 * sum(cpu[lanes, b]) / len(cpu[lanes, b]):.1f}" for b in batches]
        print(f"| {lanes} lane{'s' if lanes > 1 else ''} | " + " | ".join(cells) + " |", flush=True)


def kv_table(model: Any, batches: list[int], opts: argparse.Namespace) -> None:
    """The int8 model's decode step with each KV-cache dtype, through the native kernels and PyTorch's operators."""
    variants = [(kernels, dtype) for kernels in ("native", "torch") for dtype in ("float32", "float16", "bfloat16")]
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(opts.rounds):
        for b in batches:
            for kernels, dtype in variants:
                ms = decode_step_ms(model, b, opts.context, opts.steps, kernels=kernels, kv_cache_dtype=dtype)
                best[kernels, dtype, b] = min(best.get((kernels, dtype, b), ms), ms)
    print("\n| decode step, int8 linears | " + " | ".join(f"batch {b} (ms)" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for kernels, dtype in variants:
        print(f"| {kernels} ops, KV {dtype} | " + " | ".join(f"{best[kernels, dtype, b]:.1f}" for b in batches) + " |",
              flush=True)


if __name__ == "__main__":
    main()
