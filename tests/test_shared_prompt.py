"""Identical prompts admitted together compute their common blocks once: ``n`` choices of one
request (and any burst of one user's identical prompts) share the first one's prompt blocks
through the prefix cache, within one cache salt only, and reply exactly as before."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import wait_until
from test_metrics import scrape, value
from test_prefix_cache_isolation import _seq

from chatstream import ChatService, Settings
from chatstream.engine.core.block_manager import BlockManager
from chatstream.engine.core.scheduler import Scheduler
from chatstream.web.app import create_app

QUERIED, HITS = "chatstream_prefix_cache_queried_tokens_total", "chatstream_prefix_cache_hit_tokens_total"
QUESTION = ("Write a short poem about the sea, the moon and a lighthouse keeper who counts the waves every "
            "night, then say in one sentence what the poem means.")


def test_n_choices_compute_the_prompts_full_blocks_once(serve, default_model):
    model, tokenizer = default_model
    config = Settings(session_secret="s", session_store="memory://", concurrency=4)
    url = serve(create_app(config, ChatService(config, model=model, tokenizer=tokenizer))).url
    assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=60)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "n": 4,
                            "max_tokens": 6, "temperature": 1.0, "seed": 11, "user": "alice"}

    def ask(user: str) -> tuple[list[str], int, float, float]:
        with httpx.Client(base_url=url, timeout=120) as client:
            before = scrape(client)
            reply = client.post("/v1/chat/completions", json={**body, "user": user})
            assert reply.status_code == 200, reply.text
            after = scrape(client)
        data = reply.json()
        texts = [c["message"]["content"] for c in sorted(data["choices"], key=lambda c: c["index"])]
        prompt = data["usage"]["prompt_tokens"]  # once, as OpenAI counts it
        return texts, prompt, value(after, QUERIED) - value(before, QUERIED), value(after, HITS) - value(before, HITS)

    texts, prompt, queried, hits = ask("alice")
    shared = (prompt - 1) // 16 * 16  # the full blocks before the last token (block size 16)
    assert shared >= 32
    assert queried == 4 * prompt
    # The first choice computes the prompt; the three others find its full blocks in the cache
    # (before: all four were admitted in one step and each computed the whole prompt, 0 hits).
    assert hits == 3 * shared
    assert len(set(texts)) > 1  # four seeds, four replies
    # A cold user of their own: the same computation, the same replies, whatever the timing.
    assert ask("bob") == (texts, prompt, 4 * prompt, 3 * shared)
    # All four from the cache at once: choices 2-4 computed what they computed the first time. (The
    # first one now reads cached blocks where it computed them: with int8 activations that may move
    # a near tie, see test_forward_lanes, so it is not compared.)
    warm, _, queried, hits = ask("alice")
    assert (warm[1:], queried, hits) == (texts[1:], 4 * prompt, 4 * shared)


def test_only_requests_of_the_same_salt_wait_to_share_a_block():
    """Two users each send one prompt twice, in one burst: the second copy of each waits a step and
    shares its user's blocks; the other user's first copy is admitted at once, and shares nothing."""
    blocks = BlockManager(64, 4)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    tokens = list(range(1, 14))  # 3 full blocks and one token
    burst = [_seq(tokens, "alice"), _seq(tokens, "alice"), _seq(tokens, "bob"), _seq(tokens, "bob")]
    for seq in burst:
        scheduler.add(seq)
    first = scheduler.schedule()
    assert [c.seq for c in first.chunks] == [burst[0], burst[2]]
    assert [c.num_tokens for c in first.chunks] == [13, 13]
    assert list(scheduler.waiting) == [burst[1], burst[3]]  # still first in line
    for chunk in first.chunks:  # the step ran: their blocks are computed and registered
        chunk.seq.num_computed_tokens += chunk.num_tokens
        blocks.register_computed(chunk.seq)
        chunk.seq.token_ids.append(99)  # and sampled a token
    second = scheduler.schedule()
    # The first copies decode; the second copies compute only the last token (12 from the cache).
    assert [(c.seq, c.num_tokens) for c in second.chunks] == [(burst[0], 1), (burst[2], 1), (burst[1], 1), (burst[3], 1)]
    assert burst[1].block_table[:3] == burst[0].block_table[:3]
    assert burst[3].block_table[:3] == burst[2].block_table[:3]
    assert set(burst[1].block_table[:3]).isdisjoint(burst[3].block_table[:3])
    assert (blocks.num_queried_tokens, blocks.num_hit_tokens) == (4 * 13, 2 * 12)
