"""A sequence preempted for KV-cache room is recomputed exactly as it was first computed.

Its prompt is prefilled in chunks that end where the prompt ends, then its reply so far runs one
token a step, through the decode path those tokens first took, so its K/V (and every later greedy
token) are what the uninterrupted run had. One prefill over prompt and reply is a different
computation whose last bits differ, and a near-tied greedy token could then flip.
"""

from __future__ import annotations

import asyncio
from typing import Any

from test_engine import chat, generate_text

from chatstream.engine.core.block_manager import BlockManager
from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.engine.core.scheduler import Scheduler
from chatstream.engine.core.sequence import Sequence
from chatstream.engine.model.runner import kv_bytes_per_token
from chatstream.engine.sampling_params import SamplingParams


def _seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(request_id=name, token_ids=list(range(1, prompt_len + 1)), params=SamplingParams(), seed=0,
                    stream=None, detokenizer=None, stop_matcher=None)  # type: ignore[arg-type]


def _run(scheduler: Scheduler, steps: int, log: dict[str, list[int]]) -> None:
    """``steps`` engine steps without a model: chunks are computed, completing ones sample token 7."""
    for _ in range(steps):
        for chunk in scheduler.schedule().chunks:
            log.setdefault(chunk.seq.request_id, []).append(chunk.num_tokens)
            completes = chunk.completes
            chunk.seq.num_computed_tokens += chunk.num_tokens
            scheduler.block_manager.register_computed(chunk.seq)
            if completes:
                chunk.seq.token_ids.append(7)


def test_a_preempted_sequence_recomputes_its_prompt_then_its_reply_token_by_token():
    blocks = BlockManager(6, 4, enable_prefix_caching=False)  # 24 token slots
    scheduler = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=64)
    old, new = _seq("old", 6), _seq("new", 6)
    scheduler.add(old)
    scheduler.add(new)
    log: dict[str, list[int]] = {}
    for _ in range(20):  # both grow until the older needs the newer's blocks
        _run(scheduler, 1, log)
        if scheduler.num_preemptions:
            break
    assert scheduler.num_preemptions == 1 and new in scheduler.waiting
    assert log["new"][0] == 6 and set(log["new"][1:]) == {1}  # its first life: prefill, then decodes
    first_life = len(log["new"])
    reply_so_far = new.num_completion_tokens
    assert reply_so_far >= 2
    while scheduler.waiting or new in scheduler.running:
        if old in scheduler.running and old.num_completion_tokens >= 12:
            scheduler.finish(old)  # the older one ends: room comes back
        _run(scheduler, 1, log)
        if new.num_completion_tokens > reply_so_far:
            break
    # Recomputed: the prompt in one chunk, then each token of the reply so far alone.
    assert log["new"][first_life:] == [6] + [1] * reply_so_far


async def test_replies_preempted_again_and_again_equal_the_replies_alone(default_model: tuple[Any, Any]) -> None:
    """Room for 12 blocks, four float32 replies of ~30 + 48 tokens: preempted many times over."""
    model, tokenizer = default_model
    roomy = LLMEngine(model, tokenizer, max_num_seqs=4, kv_cache_memory_bytes=64 << 20, quantization=None,
                      kv_cache_dtype="float32")
    tiny = LLMEngine(model, tokenizer, max_num_seqs=4, kv_cache_memory_bytes=12 * 16 * kv_bytes_per_token(model),
                     block_size=16, quantization=None, kv_cache_dtype="float32")  # 12 blocks of the model's float32
    try:
        questions = ["Describe the sea.", "Describe a cat.", "Why is the sky blue?", "Name three rivers."]
        prompts = [chat(tokenizer, q) for q in questions]
        params = SamplingParams(max_new_tokens=48)
        alone = [await generate_text(roomy, p, params) for p in prompts]
        together = await asyncio.gather(*(generate_text(tiny, p, params) for p in prompts))
        assert tiny.num_preemptions >= 2
        assert [text for text, _ in together] == [text for text, _ in alone]
        assert [f.completion_tokens for _, f in together] == [f.completion_tokens for _, f in alone]
    finally:
        await tiny.shutdown()
        await roomy.shutdown()
