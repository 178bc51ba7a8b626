"""Grammars are prepared and compiled beside the engine, never inside its step.

llguidance needs a view of the 49k-token vocabulary and per-vocabulary state built at its first
mask: ~1.5 s on a quiet core, 7-10 s on a busy machine, mostly holding the GIL. Done inside the
engine's step at the first constrained request, it stalled every user's stream for as long (found
from outside: another client's largest gap between tokens went from 0.18 s to 9.7 s). Now it is
built as the engine starts, and each request's own grammar compiles on a thread beside the engine
before the request is scheduled.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import llguidance.hf
import pytest_asyncio
from test_engine import chat

from chatstream.engine import SamplingParams
from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.service.structured import json_schema_grammar

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest_asyncio.fixture(loop_scope="session")
async def fresh(default_model: tuple[Any, Any]) -> Any:
    """An engine on a tokenizer no engine has used yet (llguidance's state is kept per tokenizer)."""
    model, tokenizer = default_model
    engine = LLMEngine(model, copy.deepcopy(tokenizer), max_num_seqs=4, kv_cache_memory_bytes=32 << 20)
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_the_first_constrained_request_does_not_stall_other_streams(fresh: LLMEngine) -> None:
    tokenizer = fresh.tokenizer
    started = time.perf_counter()  # what building llguidance's tokenizer alone costs on this machine now
    llguidance.hf.from_tokenizer(copy.deepcopy(tokenizer))
    build_s = time.perf_counter() - started
    deadline = time.monotonic() + 120
    while not fresh.grammars_prepared:
        assert time.monotonic() < deadline, "llguidance's state was never prepared"
        await asyncio.sleep(0.05)

    never_ends = SamplingParams(max_new_tokens=400, logit_bias=((int(tokenizer.eos_token_id), -100.0),))
    free = fresh.generate(chat(tokenizer, "Tell me a long story."), never_ends)
    arrivals: list[float] = []
    first = asyncio.Event()

    async def read_free() -> None:
        async for output in free:
            if output.text:
                arrivals.append(time.perf_counter())
                first.set()
            if output.finished:
                return

    reader = asyncio.create_task(read_free())
    await asyncio.wait_for(first.wait(), 60)
    submitted = time.perf_counter()
    text = ""
    async for output in fresh.generate(chat(tokenizer, "A person as JSON."),
                                       SamplingParams(max_new_tokens=40, grammar=json_schema_grammar(SCHEMA))):
        text += output.text
        if output.finished:
            break
    answered = time.perf_counter()
    free.cancel()
    await reader
    around = [t for t in arrivals if submitted <= t <= answered] + [answered]
    longest_gap = max(b - a for a, b in zip([submitted, *around], around))
    # The old engine built that state in the step of the first constrained row: the free stream's
    # longest gap was the tokenizer's build and more (0.54 s, the build alone 0.5 s, on a quiet core).
    assert longest_gap < build_s * 0.6, (longest_gap, build_s)
    assert set(json.loads(text)) == {"name", "age"}


async def test_a_request_cancelled_while_its_grammar_compiles_ends_cancelled(fresh: LLMEngine) -> None:
    tokenizer = fresh.tokenizer
    params = SamplingParams(max_new_tokens=8, grammar=json_schema_grammar(SCHEMA))
    stream = fresh.generate(chat(tokenizer, "A person as JSON."), params)
    stream.cancel()
    outputs = [output async for output in stream]
    assert outputs[-1].finished and outputs[-1].finish_reason == "cancelled"
    assert fresh.num_running == 0 and fresh.num_waiting == 0
    # The engine still serves constrained requests afterwards.
    final = [output async for output in fresh.generate(chat(tokenizer, "A person as JSON."), params)][-1]
    assert final.finish_reason in ("stop", "length")


async def test_a_grammar_that_fails_to_compile_ends_its_request_unscheduled(fresh: LLMEngine) -> None:
    steps = fresh.num_steps
    bad = SamplingParams(max_new_tokens=8, grammar='{"grammars": [{"lark_grammar": "start: no_such_rule"}]}')
    outputs = [output async for output in fresh.generate(chat(fresh.tokenizer, "Hello"), bad)]
    assert outputs[-1].finish_reason == "error" and "the grammar failed" in (outputs[-1].error or "")
    assert fresh.num_steps == steps and fresh.num_running == 0 and fresh.num_waiting == 0  # no prefill for it
