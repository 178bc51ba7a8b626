"""A long prompt is prefilled over several engine steps; each step tells the turn it is moving, so the
stall watchdog (``stall_timeout_s``) ends only a generation that is stuck, never a long prefill.

Found in a real Open WebUI 0.12.4 run: its default chat request carries 36 built-in tools, a 7025-token
prompt that took 110 s to prefill on a loaded 2-core machine, and the turn was ended at 60 s with
``engine_timeout`` before its first token.
"""

from __future__ import annotations

from typing import Any

from chatstream.engine import SamplingParams
from chatstream.engine.core.llm_engine import LLMEngine


async def test_each_prefill_chunk_of_a_long_prompt_is_an_event(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    engine = LLMEngine(model, tokenizer, max_num_seqs=2, kv_cache_memory_bytes=32 << 20,
                       max_num_batched_tokens=16, quantization=None)
    await engine.start()
    try:
        messages = [{"role": "user", "content": "Tell me about the sea. " * 12}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
        events = []
        async for output in engine.generate(prompt, SamplingParams(max_new_tokens=3)):
            events.append(output)
        first_text = next(i for i, e in enumerate(events) if e.text or e.finished)
        # 16 tokens a step: every step before the last prompt chunk is an empty event, in order.
        assert first_text == (len(prompt) - 1) // 16 and first_text >= 5
        assert all(e.text == "" and not e.finished for e in events[:first_text])
        final = events[-1]
        assert final.finished and final.completion_tokens == 3 and final.prompt_tokens == len(prompt)
        assert "".join(e.text for e in events)  # the reply is unchanged by the empty events
    finally:
        await engine.shutdown()
