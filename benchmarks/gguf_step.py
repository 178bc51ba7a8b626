"""Time one engine decode step of a quantized GGUF model: its blocks as stored (engine/quant) against the float32 copy's int8 linears.

    .venv/bin/python -m benchmarks.gguf_step [--model FILE.gguf] [--batches 1,16] [--threads 1,2] [--no-float]

Every sequence has a ``--context``-token prompt already prefilled; the figure is the fastest of
``--steps`` decode steps over ``--rounds`` interleaved rounds (``benchmarks.step_time``'s
``decode_step_ms``), per thread count: the block kernels split each product across
``torch.get_num_threads()`` threads, the int8 path's native kernel runs on one. ``--no-float``
skips the float32 copy (an 8B file's would not fit in memory). Absolute times drift on a shared
machine: compare variants within one run.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from chatstream.engine.quant import int8 as quantization
from chatstream.model_loader import load_model

from .step_time import decode_step_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a quantized .gguf file (default: the embedded model's)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", default=str(torch.get_num_threads()), help="thread counts to time, e.g. 1,2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-float", action="store_true", help="only the blocks")
    opts = parser.parse_args()
    batches = [int(b) for b in opts.batches.split(",")]
    thread_counts = [int(t) for t in opts.threads.split(",")]
    models: dict[str, Any] = {"GGUF blocks": load_model(opts.model, quantized=True)[0]}
    if not opts.no_float:
        model, _ = load_model(opts.model, quantized=False)
        quantization.quantize_linears_int8(model)
        models["float32 copy, int8 linears"] = model
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, context {opts.context}, "
          f"best of {opts.steps} decode steps x {opts.rounds} rounds")
    best: dict[tuple[str, int, int], float] = {}
    for _ in range(opts.rounds):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for b in batches:
                for label, model in models.items():
                    ms = decode_step_ms(model, b, opts.context, opts.steps)
                    best[label, threads, b] = min(best.get((label, threads, b), ms), ms)
    print("| weights | threads | " + " | ".join(f"batch {b} (ms)" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for threads in thread_counts:
        for label in models:
            print(f"| {label} | {threads} | " + " | ".join(f"{best[label, threads, b]:.1f}" for b in batches) + " |")


if __name__ == "__main__":
    main()
