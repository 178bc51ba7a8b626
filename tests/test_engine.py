"""The continuous-batching engine, run on the real default model (SmolLM2-135M, CPU).

Replies are kept short (a few dozen tokens) so the whole file runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
import pytest_asyncio
import torch

from chatstream.engine import GenerationOutput, SamplingParams
from chatstream.engine.core.detokenizer import IncrementalDetokenizer
from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.engine.core.stop_strings import StopStringMatcher
from chatstream.engine.model.runner import kv_bytes_per_token
from chatstream.engine.stream import RequestStream

GREEDY = SamplingParams(max_new_tokens=16)

QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Name three colours.",
    "Explain in one sentence why the sky is blue, and mention the name of the physical effect.",
    "Write a haiku about the sea.",
    "What is 12 times 12? Answer with the number and then explain how you computed it step by step.",
    "Give me a synonym for happy, please.",
    "Translate 'good morning' into French, Spanish and German, one per line, with no extra commentary.",
]


def chat(tokenizer: Any, text: str) -> list[int]:
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


async def collect(stream: RequestStream) -> tuple[list[str], GenerationOutput]:
    """All deltas (the final event's text included) and the final event."""
    deltas: list[str] = []
    async for output in stream:
        deltas.append(output.text)
        if output.finished:
            return deltas, output
    raise AssertionError("stream ended without a final output")


@pytest.fixture(scope="module")
def tokenizer(default_model: tuple[Any, Any]) -> Any:
    return default_model[1]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(default_model: tuple[Any, Any]) -> Any:
    model, tokenizer = default_model
    # float32 weights and KV cache, so replies can be compared with transformers' own generate
    # (int8: test_quantization.py; a 16-bit KV cache: test_backend.py).
    engine = LLMEngine(model, tokenizer, max_num_seqs=8, kv_cache_memory_bytes=64 << 20, quantization=None,
                       kv_cache_dtype="float32")
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def uncached_engine(default_model: tuple[Any, Any], engine: LLMEngine) -> Any:
    """The same engine without prefix caching: the reference for what the cache must not change."""
    model, tokenizer = default_model
    uncached = LLMEngine(
        model, tokenizer, max_num_seqs=8, kv_cache_memory_bytes=64 << 20, quantization=None,
        enable_prefix_caching=False, kv_cache_dtype="float32",
    )
    yield uncached
    await uncached.shutdown()


async def generate_text(
    engine: LLMEngine, prompt: list[int], params: SamplingParams
) -> tuple[str, GenerationOutput]:
    deltas, final = await collect(engine.generate(prompt, params))
    return "".join(deltas), final


# -- correctness --


async def test_alone_matches_transformers_greedy_generate(engine: LLMEngine, tokenizer: Any) -> None:
    """The paged attention computes what the model's own attention computes."""
    from chatstream.model_loader import load_model

    reference_model, _ = load_model(quantized=False)  # a separate float32 copy: the engine swapped the shared one's attention
    for question in QUESTIONS[1:3]:
        prompt = chat(tokenizer, question)
        with torch.inference_mode():
            ids = reference_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        expected = tokenizer.decode(ids[0, len(prompt) :], skip_special_tokens=True)
        text, final = await generate_text(engine, prompt, SamplingParams(max_new_tokens=16))
        assert text == expected


async def test_concurrent_greedy_replies_equal_replies_run_alone(engine: LLMEngine, tokenizer: Any) -> None:
    """Batching changes nothing: 8 prompts of different lengths, half of them arriving while the
    others are mid-reply (so prefills and decodes share steps), give the same replies as alone.
    Text and token counts are compared; equal text from the same tokenizer means equal tokens."""
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)
    alone = [await generate_text(engine, p, GREEDY) for p in prompts]

    async def staggered(prompt: list[int], started: asyncio.Event) -> tuple[str, GenerationOutput]:
        deltas: list[str] = []
        async for output in engine.generate(prompt, GREEDY):
            deltas.append(output.text)
            started.set()
            if output.finished:
                return "".join(deltas), output
        raise AssertionError("no final output")

    events = [asyncio.Event() for _ in prompts]
    first = [asyncio.create_task(staggered(p, e)) for p, e in zip(prompts[:4], events)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events[:4])), 30)
    assert engine.num_running >= 1
    second = [asyncio.create_task(staggered(p, e)) for p, e in zip(prompts[4:], events[4:])]
    together = await asyncio.gather(*first, *second)

    for (text_alone, final_alone), (text, final) in zip(alone, together):
        assert text == text_alone
        assert final.completion_tokens == final_alone.completion_tokens
        assert final.finish_reason == final_alone.finish_reason


# -- sampling --


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: LLMEngine, tokenizer: Any) -> None:
    prompt = chat(tokenizer, "Tell me a story about a dragon.")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    alone, _ = await generate_text(engine, prompt, params)
    others = [
        generate_text(engine, chat(tokenizer, q), SamplingParams(max_new_tokens=16, temperature=0.9, seed=i))
        for i, q in enumerate(QUESTIONS[:2])
    ]
    (in_batch, _), *_ = await asyncio.gather(generate_text(engine, prompt, params), *others)
    assert in_batch == alone

    other_seed, _ = await generate_text(engine, prompt, dataclasses.replace(params, seed=4321))
    assert other_seed != alone


async def test_repetition_penalty_changes_a_greedy_reply(engine: LLMEngine, tokenizer: Any) -> None:
    prompt = chat(tokenizer, "Count from one to twenty, separated by commas.")
    plain, _ = await generate_text(engine, prompt, SamplingParams(max_new_tokens=20))
    penalised, _ = await generate_text(engine, prompt, SamplingParams(max_new_tokens=20, repetition_penalty=1.5))
    assert penalised != plain


async def test_min_p_and_openai_penalties_reach_the_sampler(engine: LLMEngine, tokenizer: Any) -> None:
    """min_p 1 keeps only the most likely token: a hot sampled reply is the greedy one; a frequency
    penalty (over the reply only) changes a reply that repeats itself."""
    prompt = chat(tokenizer, "Count from one to twenty, separated by commas.")
    plain, _ = await generate_text(engine, prompt, SamplingParams(max_new_tokens=20))
    only_top = SamplingParams(max_new_tokens=20, temperature=1.5, min_p=1.0, seed=5)
    assert (await generate_text(engine, prompt, only_top))[0] == plain
    penalised, _ = await generate_text(engine, prompt, SamplingParams(max_new_tokens=20, frequency_penalty=2.0))
    assert penalised != plain
    present, _ = await generate_text(engine, prompt, SamplingParams(max_new_tokens=20, presence_penalty=2.0))
    assert present != plain


async def test_extreme_but_valid_parameters_never_disturb_a_neighbour(engine: LLMEngine, tokenizer: Any) -> None:
    """Values at the edge of every bound run next to a normal request, which replies as if alone."""
    normal = chat(tokenizer, QUESTIONS[1])
    alone, _ = await generate_text(engine, normal, GREEDY)
    extreme = SamplingParams(
        max_new_tokens=8, temperature=100, top_k=2**31 - 1, top_p=1e-9, repetition_penalty=100, seed=2**64 - 1
    )
    (text, final), (_, odd) = await asyncio.gather(
        generate_text(engine, normal, GREEDY), generate_text(engine, chat(tokenizer, QUESTIONS[2]), extreme)
    )
    assert text == alone and final.finish_reason in ("stop", "length")
    assert odd.finish_reason in ("stop", "length") and odd.error is None


async def test_a_row_that_cannot_be_sampled_fails_alone(engine: LLMEngine, tokenizer: Any) -> None:
    """A value that slips past validation (here forced onto a frozen SamplingParams: a top_k that
    overflows int64, which once failed every sequence of the step) ends only its own request."""
    broken = SamplingParams(max_new_tokens=8, temperature=0.8, seed=1)
    object.__setattr__(broken, "top_k", 2**63)
    normal = chat(tokenizer, QUESTIONS[1])
    alone, _ = await generate_text(engine, normal, GREEDY)
    (text, final), (_, failed) = await asyncio.gather(
        generate_text(engine, normal, GREEDY), generate_text(engine, chat(tokenizer, QUESTIONS[2]), broken)
    )
    assert failed.finish_reason == "error" and "sampling failed" in (failed.error or "")
    assert text == alone and final.finish_reason in ("stop", "length")
    assert engine.num_running == 0 and engine.num_free_blocks == engine.num_blocks


# -- stopping --


async def test_stop_strings_end_the_reply_and_are_never_shown(engine: LLMEngine, tokenizer: Any) -> None:
    prompt = chat(tokenizer, QUESTIONS[3])
    full, _ = await generate_text(engine, prompt, SamplingParams(max_new_tokens=24))
    words = full.split(" ")
    assert len(words) > 6, full
    # The end of one word, a space, the start of the next: byte-level BPE never puts those in
    # one token, so the stop string spans a token boundary.
    stop = words[3][-2:] + " " + words[4][:2]
    assert stop in full

    deltas, final = await collect(engine.generate(prompt, SamplingParams(max_new_tokens=24, stop=(stop, "zzqq"))))
    assert "".join(deltas) == full[: full.index(stop)]
    assert final.finish_reason == "stop"
    assert not any(stop in delta for delta in deltas)


async def test_text_held_back_for_a_stop_string_is_released_when_it_does_not_complete(
    engine: LLMEngine, tokenizer: Any
) -> None:
    prompt = chat(tokenizer, QUESTIONS[1])
    full, final = await generate_text(engine, prompt, SamplingParams(max_new_tokens=12))
    almost = full[-3:] + "\u2603"  # the reply's own ending, then a character it never produces
    text, final_with_stop = await generate_text(engine, prompt, SamplingParams(max_new_tokens=12, stop=(almost,)))
    assert text == full
    assert final_with_stop.finish_reason == final.finish_reason


async def test_end_of_sequence_token_stops_and_is_not_shown(engine: LLMEngine, tokenizer: Any) -> None:
    text, final = await generate_text(engine, chat(tokenizer, "Say hi."), SamplingParams(max_new_tokens=64))
    assert final.finish_reason == "stop"
    assert "<|im_end|>" not in text
    assert final.completion_tokens < 64


async def test_max_new_tokens_ends_with_length(engine: LLMEngine, tokenizer: Any) -> None:
    prompt = chat(tokenizer, QUESTIONS[4])
    text, final = await generate_text(engine, prompt, SamplingParams(max_new_tokens=5))
    assert final.finish_reason == "length"
    assert final.completion_tokens == 5
    assert final.prompt_tokens == len(prompt)
    assert text


# -- cancellation and the KV budget --


async def test_cancel_ends_the_stream_promptly_and_frees_its_blocks(engine: LLMEngine, tokenizer: Any) -> None:
    long = SamplingParams(max_new_tokens=200, temperature=0.8, seed=1)
    cancelled = engine.generate(chat(tokenizer, "Write a very long story about a lighthouse."), long)
    other = asyncio.create_task(generate_text(engine, chat(tokenizer, QUESTIONS[2]), GREEDY))
    first = await cancelled.__anext__()
    assert not first.finished
    started = time.monotonic()
    cancelled.cancel()
    _, final = await asyncio.wait_for(collect(cancelled), 10)
    assert final.finish_reason == "cancelled"
    # Dropped before the next step: within one step (~0.1 s), with slack for a busy 2-core machine.
    assert time.monotonic() - started < 3
    assert final.completion_tokens < 200

    text, other_final = await other
    assert other_final.finish_reason in ("stop", "length") and text
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert engine.num_free_blocks == engine.num_blocks


async def test_a_request_that_does_not_fit_waits_and_one_that_never_fits_fails(
    default_model: tuple[Any, Any], engine: LLMEngine, tokenizer: Any
) -> None:
    model, _ = default_model
    block_size = 16
    tiny = LLMEngine(
        model,
        tokenizer,
        max_num_seqs=4,
        kv_cache_memory_bytes=4 * block_size * kv_bytes_per_token(model),  # 4 blocks = 64 tokens
        block_size=block_size,
        quantization=None,
        kv_cache_dtype="float32",
    )
    try:
        words = tokenizer.encode(" ".join(["apple"] * 200), add_special_tokens=False)
        other = tokenizer.encode(" ".join(["pear"] * 200), add_special_tokens=False)
        # 3 blocks, 2 blocks (not a prefix of the first, which it could share), > 4 blocks
        first, second, huge = words[:40], other[:30], words[:65]
        params = SamplingParams(max_new_tokens=8)
        order: list[str] = []

        async def note_first_output(name: str, prompt: list[int]) -> GenerationOutput:
            stream = tiny.generate(prompt, params)
            output = await stream.__anext__()
            order.append(f"{name} started")
            while not output.finished:
                output = await stream.__anext__()
            order.append(f"{name} done")
            return output

        task_first = asyncio.create_task(note_first_output("first", first))
        await asyncio.sleep(0)
        task_second = asyncio.create_task(note_first_output("second", second))
        _, final_huge = await collect(tiny.generate(huge, params))
        assert final_huge.finish_reason == "error"
        assert "KV cache" in (final_huge.error or "")

        final_first, final_second = await asyncio.wait_for(asyncio.gather(task_first, task_second), 30)
        assert final_first.finish_reason == final_second.finish_reason == "length"
        assert order.index("second started") > order.index("first done")
        assert tiny.num_free_blocks == tiny.num_blocks
    finally:
        await tiny.shutdown()


async def test_preemption_and_chunked_prefill_do_not_change_replies(
    default_model: tuple[Any, Any], engine: LLMEngine, tokenizer: Any
) -> None:
    """With room for one reply at a time, the newer one is preempted and recomputed later; with
    a token budget of 16 per step, prompts are prefilled in chunks. Greedy replies stay the same."""
    model, _ = default_model
    tiny = LLMEngine(
        model,
        tokenizer,
        max_num_seqs=4,
        kv_cache_memory_bytes=4 * 16 * kv_bytes_per_token(model),  # 4 blocks: 64 tokens
        block_size=16,
        kv_cache_dtype="float32",
        max_num_batched_tokens=16,
        quantization=None,
    )
    try:
        # 24 + 20 tokens each: two blocks each to start, three each to finish.
        prompts = [chat(tokenizer, "Describe the sea.")[-24:], chat(tokenizer, "Describe a cat.")[-24:]]
        params = SamplingParams(max_new_tokens=20)
        alone = [await generate_text(engine, p, params) for p in prompts]
        together = await asyncio.gather(*(generate_text(tiny, p, params) for p in prompts))
        assert [text for text, _ in together] == [text for text, _ in alone]
        assert tiny.num_preemptions >= 1
    finally:
        await tiny.shutdown()


# -- prefix caching --


def conversation(tokenizer: Any, turns: list[tuple[str, str]], question: str) -> list[int]:
    messages: list[dict[str, str]] = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": question})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)],
    ids=["greedy", "seeded"],
)
async def test_later_turns_reuse_the_cached_prefix_and_reply_exactly_as_without_it(
    engine: LLMEngine, uncached_engine: LLMEngine, tokenizer: Any, params: SamplingParams
) -> None:
    turns: list[tuple[str, str]] = []
    previous_prompt: list[int] = []
    for question in ["What is the capital of France?", "And of Spain?", "Which of the two is bigger?"]:
        prompt = conversation(tokenizer, turns, question)
        assert prompt[: len(previous_prompt)] == previous_prompt  # each turn extends the last
        hits_before = engine.prefix_cache_hit_tokens
        cached, cached_final = await generate_text(engine, prompt, params)
        reused = engine.prefix_cache_hit_tokens - hits_before
        plain, plain_final = await generate_text(uncached_engine, prompt, params)
        assert cached == plain
        assert cached_final.completion_tokens == plain_final.completion_tokens
        # Every full block of the previous turn's prompt (at least) came from the cache.
        assert reused >= len(previous_prompt) // engine.block_size * engine.block_size
        if previous_prompt:
            assert reused > 0
        turns.append((question, cached))
        previous_prompt = prompt
    assert uncached_engine.prefix_cache_hit_tokens == 0
    assert engine.num_free_blocks == engine.num_blocks  # all blocks are free or cached, none owned
    assert engine.num_cached_blocks > 0


async def test_a_regenerate_computes_only_the_last_block(engine: LLMEngine, tokenizer: Any) -> None:
    prompt = chat(tokenizer, QUESTIONS[5])
    first, _ = await generate_text(engine, prompt, GREEDY)
    queried, hits = engine.prefix_cache_queried_tokens, engine.prefix_cache_hit_tokens
    again, _ = await generate_text(engine, prompt, GREEDY)
    assert again == first
    assert engine.prefix_cache_queried_tokens - queried == len(prompt)
    assert engine.prefix_cache_hit_tokens - hits == (len(prompt) - 1) // engine.block_size * engine.block_size


async def test_a_burst_of_identical_prompts_computes_the_prompt_once_per_user(
    engine: LLMEngine, uncached_engine: LLMEngine, tokenizer: Any
) -> None:
    """``n`` choices, or any burst of one user's identical prompts, reach the engine in one step:
    the first computes the prompt, the others wait a step and take its full blocks from the cache
    (before, each computed the whole prompt: 0 hits). Only within one cache salt; the replies are
    those of each request alone without the cache."""
    prompt = chat(tokenizer, "Write a short poem about the sea, the moon and a lighthouse keeper who counts the "
                             "waves every night, then say in one sentence what the poem means.")
    requests = [SamplingParams(max_new_tokens=5, temperature=1.0, seed=seed, cache_salt=salt)
                for salt in ("burst-alice", "burst-bob") for seed in (1, 2, 3)]
    queried, hits = engine.prefix_cache_queried_tokens, engine.prefix_cache_hit_tokens
    streams = [engine.generate(prompt, params) for params in requests]  # one burst, as n choices start
    burst = [await collect(stream) for stream in streams]
    shared = (len(prompt) - 1) // engine.block_size * engine.block_size
    assert shared >= 32
    assert engine.prefix_cache_queried_tokens - queried == 6 * len(prompt)
    assert engine.prefix_cache_hit_tokens - hits == 2 * 2 * shared  # per user: two of three share the first's
    alone = [await generate_text(uncached_engine, prompt, params) for params in requests]
    assert ["".join(deltas) for deltas, _ in burst] == [text for text, _ in alone]
    assert len({text for text, _ in alone}) > 1


async def test_eviction_under_a_tiny_cache_keeps_replies_correct(
    default_model: tuple[Any, Any], uncached_engine: LLMEngine, tokenizer: Any
) -> None:
    """8 blocks for prompts of 2-4 blocks each: cached prefixes are shared by concurrent requests,
    evicted least recently used when room is needed, and replies never change."""
    model, _ = default_model
    tiny = LLMEngine(
        model, tokenizer, max_num_seqs=4, kv_cache_memory_bytes=8 * 16 * kv_bytes_per_token(model),
        block_size=16, quantization=None, kv_cache_dtype="float32",
    )
    try:
        prompts = [chat(tokenizer, q)[-n:] for q, n in zip(QUESTIONS[3:7], (40, 50, 33, 60))]
        params = SamplingParams(max_new_tokens=10)
        expected = [await generate_text(uncached_engine, p, params) for p in prompts]
        order = [0, 0, 1, 2, 0, 3, 1, 1, 2, 0]  # repeats (hits) and far more blocks than the cache holds
        for i in order:
            text, final = await generate_text(tiny, prompts[i], params)
            assert (text, final.completion_tokens) == (expected[i][0], expected[i][1].completion_tokens)
        # Two at once on the same cached prefix share its blocks.
        both = await asyncio.gather(*(generate_text(tiny, prompts[2], params) for _ in range(2)))
        assert [text for text, _ in both] == [expected[2][0]] * 2
        assert tiny.prefix_cache_hit_tokens > 0
        assert tiny.num_free_blocks == tiny.num_blocks
    finally:
        await tiny.shutdown()


# -- the edges --


async def test_bad_prompts_fail_at_once(engine: LLMEngine) -> None:
    _, empty = await collect(engine.generate([], GREEDY))
    assert empty.finish_reason == "error" and empty.error
    _, unknown = await collect(engine.generate([10**9], GREEDY))
    assert unknown.finish_reason == "error" and "vocabulary" in (unknown.error or "")


async def test_the_event_loop_is_never_blocked(engine: LLMEngine, tokenizer: Any) -> None:
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - before)

    tick = asyncio.create_task(ticker())
    params = SamplingParams(max_new_tokens=24, temperature=0.7, seed=3)
    await asyncio.gather(*(generate_text(engine, chat(tokenizer, q), params) for q in QUESTIONS[:4]))
    done.set()
    await tick
    assert worst < 0.2


# -- pieces --


@pytest.mark.parametrize(
    "text", ["こんにちは、世界！今日はいい天気ですね。", "Party 🎉👨‍👩‍👧‍👦 time 🇯🇵 ok 😀", "naïve café ☕ 東京"]
)
def test_incremental_detokenization_never_splits_a_character(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for detokenizer in (IncrementalDetokenizer(tokenizer), IncrementalDetokenizer(_PythonOnly(tokenizer))):
        deltas = [detokenizer.step(token) for token in ids]
        assert not any("\ufffd" in delta for delta in deltas)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


class _PythonOnly:
    """The real tokenizer without its Rust backend, to exercise the generic detokenizer path."""

    def __init__(self, tokenizer: Any) -> None:
        self.decode = tokenizer.decode


def test_stop_string_matcher_holds_back_partial_matches() -> None:
    matcher = StopStringMatcher(("STOP", "end."))
    assert matcher.feed("Hello ST") == ("Hello ", False)
    assert matcher.feed("ART and e") == ("START and ", False)
    assert matcher.feed("nd") == ("", False)
    assert matcher.feed(". more") == ("", True)

    matcher = StopStringMatcher(("</s>",))
    assert matcher.feed("a <") == ("a ", False)
    assert matcher.feed("/") == ("", False)
    assert matcher.flush() == "</"
