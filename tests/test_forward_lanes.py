"""Forward lanes: one engine step's batch shared among threads, each running the forward over its
own sequences (the native kernels use one core each). A row's logits never depend on what shares
its forward, so the replies must be the same token for token with any number of lanes."""

from __future__ import annotations

import asyncio
from typing import Any

from chatstream.engine import SamplingParams
from chatstream.engine.llm_engine import LLMEngine
from chatstream.engine.model_runner import split_lanes
from chatstream.engine.sampling_params import SamplingParams as Params
from chatstream.engine.scheduler import ScheduledChunk
from chatstream.engine.sequence import Sequence

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


async def replies(model: Any, tokenizer: Any, lanes: int) -> tuple[list[str], int, int]:
    """12 requests, half greedy and half chat-sampled with seeds, the second half arriving once every
    request of the first is decoding (so prefills and decodes share steps); the engine's default int8
    path. Returns the replies, the steps split into lanes, and the prompt tokens the prefix cache served.

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

    def encode(question: str) -> list[int]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return list(prompt["input_ids"] if not isinstance(prompt, list) else prompt)

    try:
        # The chat template's head (its first full block) is cached before any request arrives.
        [o async for o in engine.generate(encode("Hello"), SamplingParams(max_new_tokens=1))]
        hits_before = engine.prefix_cache_hit_tokens
        first_wave_decoding = asyncio.Event()
        decoding = 0

        async def one(i: int, question: str) -> str:
            nonlocal decoding
            params = (SamplingParams(max_new_tokens=24) if i % 2 else
                      SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, seed=i))
            texts = []
            async for out in engine.generate(encode(question), params):
                if not texts and i < 6:  # its prompt is computed: it decodes from now on
                    decoding += 1
                    if decoding == 6:
                        first_wave_decoding.set()
                texts.append(out.text)
            return "".join(texts)

        first = [asyncio.create_task(one(i, q)) for i, q in enumerate(QUESTIONS[:6])]
        await asyncio.wait_for(first_wave_decoding.wait(), 60)
        second = [asyncio.create_task(one(i + 6, q)) for i, q in enumerate(QUESTIONS[6:])]
        texts = await asyncio.gather(*first, *second)
        return list(texts), engine._runner.num_split_steps, engine.prefix_cache_hit_tokens - hits_before
    finally:
        await engine.shutdown()


async def test_two_lanes_give_the_same_replies_as_one(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    one_lane, split_one, cached_one = await replies(model, tokenizer, 1)
    two_lanes, split_two, cached_two = await replies(model, tokenizer, 2)
    assert split_one == 0
    assert split_two > 10  # most of the 24 decode steps ran in two lanes
    assert cached_one == cached_two == 12 * 16  # every prompt, in both runs, reused the template's first block
    assert all(one_lane) and len(set(one_lane)) > 6
    assert two_lanes == one_lane


def test_no_lane_outlives_a_failing_one(default_model: tuple[Any, Any]) -> None:
    """When one lane fails, map_lanes still waits for the others before raising: a lane must never
    be writing the cache while the engine plans its next step."""
    import threading
    import time

    from chatstream.engine.block_manager import BlockManager
    from chatstream.engine.model_runner import ModelRunner

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
