"""Forward lanes: one engine step's batch shared among threads, each running the forward over its
own sequences (the native kernels use one core each). A row's logits never depend on what shares
its forward, so the replies must be the same token for token with any number of lanes."""

from __future__ import annotations

import asyncio
from typing import Any

from chatstream.engine import SamplingParams
from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.engine.core.scheduler import ScheduledChunk
from chatstream.engine.core.sequence import Sequence
from chatstream.engine.model.runner import split_lanes
from chatstream.engine.sampling_params import SamplingParams as Params

QUESTIONS = [
    "Hi!", "What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
    "Give me a synonym for happy, please.", "Why is the sky blue?", "Tell me a joke about cats.",
    "What is 12 times 12?", "Describe a forest in autumn.", "Translate 'good morning' into French.",
    "Name a famous painter.", "What do bees make?",
]


def chunk(prompt_len: int, num_tokens: int) -> ScheduledChunk:
    seq = Sequence("r", list(range(prompt_len)), Params(), 0, None, None, None)  # type: ignore[arg-type]
    seq.num_computed_tokens = prompt_len - num_tokens
    return ScheduledChunk(seq, num_tokens)


def test_decodes_are_dealt_evenly_and_a_prefill_gets_a_lane_of_its_own() -> None:
    decodes = [chunk(40, 1) for _ in range(16)]
    lanes = split_lanes(decodes, 2)
    assert [len(g) for g in lanes] == [8, 8]
    assert {id(c) for g in lanes for c in g} == {id(c) for c in decodes}

    prefill = chunk(300, 300)
    lanes = split_lanes([*decodes, prefill], 2)
    assert sorted(len(g) for g in lanes) == [1, 16]
    assert [prefill] in lanes


def test_small_steps_run_whole() -> None:
    few = [chunk(40, 1) for _ in range(3)]
    assert split_lanes(few, 2) == [few]
    sixteen = [chunk(40, 1) for _ in range(16)]
    assert split_lanes(sixteen, 1) == [sixteen]


async def replies(model: Any, tokenizer: Any, lanes: int) -> tuple[list[str], int, int, int]:
    """12 requests, half greedy and half chat-sampled with seeds, the second half arriving once each
    of the first has streamed a token (so prefills and decodes share steps); the engine's default
    int8 path. Returns the replies, the steps that ran in lanes, the steps :func:`split_lanes` splits
    (how many depends on timing: when the engine picks up each arrival), and the prompt tokens the
    prefix cache served.

    What is promised, and so compared: a row's logits never depend on what shares its forward (its
    lane, the batch's other rows, decodes or prefills). What is not: that a prompt whose first block
    comes from the prefix cache gets the same bits as one computed whole. The cached path attends over
    the cached blocks with an offset mask, the whole prompt through a causal attention: the same sums
    in another order, last-bit apart, and int8 per-token activations can round such a difference into
    a different token (measured: "Name three colours." with seed 2 gave another reply with a 16-token
    hit than without, with one lane). Which prompts hit the cache must not depend on when a request
    arrives, then: the cache is warmed first, so every prompt reuses the same first block in any run.
    """
    engine = LLMEngine(model, tokenizer, max_num_seqs=12, kv_cache_memory_bytes=64 << 20, forward_lanes=lanes)
    runner = engine._runner
    run_step = runner.execute
    splittable = 0

    def execute(chunks: list[ScheduledChunk]) -> Any:  # the real step, counted if it should run in lanes
        nonlocal splittable
        splittable += len(split_lanes(chunks, lanes)) > 1
        return run_step(chunks)

    def encode(question: str) -> list[int]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return list(prompt["input_ids"] if not isinstance(prompt, list) else prompt)

    prompts = [encode(question) for question in QUESTIONS]
    streamed = [asyncio.Event() for _ in QUESTIONS]

    async def read(i: int, stream: Any) -> str:
        text = ""
        async for o in stream:
            streamed[i].set()
            text += o.text
        return text

    def start(i: int) -> Any:  # each wave's requests are all queued before the engine's next step can pick them
        params = (SamplingParams(max_new_tokens=24) if i % 2 else
                  SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, seed=i))
        return engine.generate(prompts[i], params)

    try:
        # The chat template's head (its first full block) is cached before any request arrives.
        [o async for o in engine.generate(encode("Hello"), SamplingParams(max_new_tokens=1))]
        hits_before = engine.prefix_cache_hit_tokens
        runner.execute = execute  # type: ignore[method-assign]
        first = [start(i) for i in range(6)]
        readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(first)]
        # Not a timed sleep: on a busy machine the first half could be done before a timed second half came.
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streamed[:6])), timeout=300)
        second = [start(i) for i in range(6, 12)]
        readers += [asyncio.create_task(read(i + 6, s)) for i, s in enumerate(second)]
        texts = await asyncio.gather(*readers)
        return list(texts), runner.num_split_steps, splittable, engine.prefix_cache_hit_tokens - hits_before
    finally:
        await engine.shutdown()


async def test_two_lanes_give_the_same_replies_as_one(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    one_lane, split_one, _, cached_one = await replies(model, tokenizer, 1)
    two_lanes, split_two, splittable, cached_two = await replies(model, tokenizer, 2)
    assert split_one == 0
    # Every step big enough ran in two lanes (how many there are depends on timing; the half's
    # six prefills, each arriving in one step, make at least one).
    assert split_two == splittable >= 1
    assert cached_one == cached_two == 12 * 16  # every prompt, in both runs, reused the template's first block
    assert all(one_lane) and len(set(one_lane)) > 6
    assert two_lanes == one_lane


def test_no_lane_outlives_a_failing_one(default_model: tuple[Any, Any]) -> None:
    """When one lane fails, map_lanes still waits for the others before raising: a lane must never
    be writing the cache while the engine plans its next step."""
    import threading
    import time

    from chatstream.engine.core.block_manager import BlockManager
    from chatstream.engine.model.runner import ModelRunner

    model, _ = default_model
    runner = ModelRunner(model, BlockManager(4, 16, enable_prefix_caching=False), lanes=2)
    done = threading.Event()

    def part(kind: str) -> str:
        if kind == "fail":
            raise RuntimeError("this lane failed")
        time.sleep(0.3)
        done.set()
        return kind

    try:
        assert runner.map_lanes(part, ["a", "b"]) == ["a", "b"]
        done.clear()
        try:
            runner.map_lanes(part, ["fail", "slow"])
        except RuntimeError as exc:
            assert "this lane failed" in str(exc)
            assert done.is_set()  # the slow lane had finished before the failure surfaced
        else:
            raise AssertionError("the failure was swallowed")
    finally:
        runner.close()
