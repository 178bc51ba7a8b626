"""What a grammar costs a step: 16 clients of the embedded model, all free, all constrained by a
JSON schema, and half of each.

    .venv/bin/python -m benchmarks.structured_output [--clients 16] [--tokens 32] [--rounds 5]

Each round runs the same ``--clients`` requests (sampled, one seed each) three times: free, under
``response_format``'s grammar (llguidance's per-row token mask, see chatstream/engine/core/grammar.py),
and mixed (the first half constrained), in an order that rotates from round to round, and reports
the engine's mean step time of each (steps and seconds counted by the engine itself), the process's
CPU time per step (every thread: on a machine shared with other work this is what the step cost,
where wall time also counts the waits for a core), the rows a step carried (tokens generated /
steps: a row that finished early makes the later steps lighter, so compare at equal rows), the
median over rounds, and the ratios to free. The issue's bar: a constrained row costs no more than
20% over a free one, so the ratios stay under 1.2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

from chatstream import load_model
from chatstream.engine import SamplingParams
from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.service.structured import json_schema_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "doctor", "artist", "teacher"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "skills", "address"],
}


async def run(
    engine: LLMEngine, prompt: list[int], tokens: int, grammars: list[str | None]
) -> tuple[float, float, float]:
    """Mean seconds per engine step, process CPU seconds per step and rows per step while one
    request per grammar (None: free) runs."""
    steps, seconds, cpu = engine.num_steps, engine.step_seconds, time.process_time()
    generated = 0

    async def one(seed: int, grammar: str | None) -> None:
        nonlocal generated
        params = SamplingParams(max_new_tokens=tokens, temperature=0.7, top_p=0.9, seed=seed, grammar=grammar)
        async for out in engine.generate(prompt, params):
            if out.finished:
                generated += out.completion_tokens

    await asyncio.gather(*(one(seed, g) for seed, g in enumerate(grammars)))
    count = max(1, engine.num_steps - steps)
    return (engine.step_seconds - seconds) / count, (time.process_time() - cpu) / count, generated / count


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    model, tokenizer = load_model()
    engine = LLMEngine(model, tokenizer, max_num_seqs=args.clients, max_model_len=1024)
    await engine.start()
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)
    grammar = json_schema_grammar(SCHEMA)
    half = args.clients // 2
    kinds: dict[str, list[str | None]] = {
        "free": [None] * args.clients,
        "constrained": [grammar] * args.clients,
        "mixed": [grammar] * half + [None] * (args.clients - half),
    }
    await run(engine, prompt, 4, kinds["constrained"])  # warm-up (and the grammar tokenizer's one-time build)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    rows: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for round_ in range(args.rounds):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            step, cpu, per_step = await run(engine, prompt, args.tokens, kinds[name])
            times[name].append(step)
            cpus[name].append(cpu)
            rows[name].append(per_step)
        print(f"round {round_}: " + ", ".join(
            f"{k} {times[k][-1] * 1000:.1f} ms/step, {cpus[k][-1] * 1000:.1f} ms CPU/step ({rows[k][-1]:.1f} rows)"
            for k in names), flush=True)
    await engine.shutdown()
    print(f"median over {args.rounds} rounds, {args.clients} clients:")
    for label, values in (("wall", times), ("CPU", cpus)):
        median = {k: statistics.median(v) for k, v in values.items()}
        print(f"  {label:4s} " + ", ".join(f"{k} {median[k] * 1000:.1f} ms/step" for k in names)
              + f"; constrained/free {median['constrained'] / median['free']:.2f}, "
              f"mixed/free {median['mixed'] / median['free']:.2f}")
    print("  rows " + ", ".join(f"{k} {statistics.median(rows[k]):.1f}" for k in names))


if __name__ == "__main__":
    asyncio.run(main())
