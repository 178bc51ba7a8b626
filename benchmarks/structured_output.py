"""What a grammar costs a step: 16 clients of the embedded model, all free or all constrained by a JSON schema.

    .venv/bin/python -m benchmarks.structured_output [--clients 16] [--tokens 48] [--rounds 3]

Each round runs the same ``--clients`` requests (sampled, one seed each) twice, free and then under
``response_format``'s grammar (llguidance's per-row token mask, see chatstream/engine/core/grammar.py),
alternating which goes first, and reports the engine's mean step time of each (steps and seconds
counted by the engine itself), the median over rounds, and the constrained/free ratio. The issue's
bar: a constrained row costs no more than 20% over a free one, so the ratio stays under 1.2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics

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


async def run(engine: LLMEngine, prompt: list[int], clients: int, tokens: int, grammar: str | None) -> float:
    """Mean seconds per engine step while ``clients`` requests of ``tokens`` tokens run."""
    steps, seconds = engine.num_steps, engine.step_seconds

    async def one(seed: int) -> None:
        params = SamplingParams(max_new_tokens=tokens, temperature=0.7, top_p=0.9, seed=seed, grammar=grammar)
        async for _ in engine.generate(prompt, params):
            pass

    await asyncio.gather(*(one(seed) for seed in range(clients)))
    return (engine.step_seconds - seconds) / max(1, engine.num_steps - steps)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    model, tokenizer = load_model()
    engine = LLMEngine(model, tokenizer, max_num_seqs=args.clients, max_model_len=1024)
    await engine.start()
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)
    grammar = json_schema_grammar(SCHEMA)
    await run(engine, prompt, args.clients, 4, grammar)  # warm-up (and the grammar tokenizer's one-time build)
    free, constrained = [], []
    for round_ in range(args.rounds):
        order = [(None, free), (grammar, constrained)]
        for g, out in order if round_ % 2 == 0 else order[::-1]:
            out.append(await run(engine, prompt, args.clients, args.tokens, g))
        print(f"round {round_}: free {free[-1] * 1000:.1f} ms/step, constrained {constrained[-1] * 1000:.1f} ms/step")
    await engine.shutdown()
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"median over {args.rounds} rounds, {args.clients} clients: free {f * 1000:.1f} ms/step, "
          f"constrained {c * 1000:.1f} ms/step, ratio {c / f:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
