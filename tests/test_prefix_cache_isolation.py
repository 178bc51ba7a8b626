"""The prefix cache is shared only within one user's requests, so nobody can confirm what another user sent.

The attack it stops (issue 18): a victim tells the chat a secret; an attacker sends the same text
with every guess and reads the prefix-cache hit counter on /metrics (or the first-token latency).
A guess that matches the victim's text hits the victim's cached blocks, a wrong one does not.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import parse_sse, wait_until
from test_metrics import scrape, value

from chatstream import ChatService, Settings
from chatstream.engine.core.block_manager import BlockManager
from chatstream.engine.core.sequence import Sequence
from chatstream.engine.sampling_params import SamplingParams
from chatstream.web.app import create_app

SECRET = "My bank PIN is {pin}. Please remember it for me and never, ever tell it to anybody else, thanks a lot."
PIN = "4821"
GUESSES = [str(pin) for pin in range(4816, 4826)]
HITS = "chatstream_prefix_cache_hit_tokens_total"


def start(serve: Any, default_model: tuple[Any, Any], **settings: Any) -> str:
    model, tokenizer = default_model
    config = Settings(session_secret="s", session_store="memory://", max_new_tokens=2, temperature=0.0,
                      **settings)
    url: str = serve(create_app(config, ChatService(config, model=model, tokenizer=tokenizer))).url
    assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=60)
    return url


def guess_hits(url: str, user: str | None = None) -> dict[str, float]:
    """The attacker: one /v1 request per guess, max_tokens 1, and the hit tokens it added to /metrics."""
    added = {}
    with httpx.Client(base_url=url, timeout=60) as attacker:
        for pin in GUESSES:
            before = value(scrape(attacker), HITS)
            body: dict[str, Any] = {"model": "any", "max_tokens": 1,
                                    "messages": [{"role": "user", "content": SECRET.format(pin=pin)}]}
            if user is not None:
                body["user"] = user
            response = attacker.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            added[pin] = value(scrape(attacker), HITS) - before
    return added


def victim_tells(victim: httpx.Client) -> None:
    assert parse_sse(victim.post("/chat_stream", json={"user_input": SECRET.format(pin=PIN)}).text)[-1][0] == "done"


def test_guessing_another_users_secret_through_the_cache_finds_nothing(serve, default_model):
    url = start(serve, default_model)
    with httpx.Client(base_url=url, timeout=60) as victim:
        victim_tells(victim)
        added = guess_hits(url)  # an anonymous API client, as in the issue
        wrong = [hits for pin, hits in added.items() if pin != PIN]
        assert added[PIN] <= max(wrong), f"the metric names the PIN: {added}"
        # Exactly what the same guesses show an API user of its own (they share their own
        # beginnings: 4820 and 4821 share "482"): the victim's text changes nothing observable.
        assert guess_hits(url, user="control") == added
        # Within one user the cache still works: the victim's next turn reuses its first one.
        before = value(scrape(victim), HITS)
        assert parse_sse(victim.post("/chat_stream", json={"user_input": "And?"}).text)[-1][0] == "done"
        assert value(scrape(victim), HITS) - before >= 32


def test_an_operator_who_shares_the_cache_across_users_gets_the_old_oracle(serve, default_model):
    """--shared-prefix-cache is what main did for everyone: there the right PIN adds more hit tokens."""
    url = start(serve, default_model, shared_prefix_cache=True)
    with httpx.Client(base_url=url, timeout=60) as victim:
        victim_tells(victim)
        added = guess_hits(url)
    wrong = [hits for pin, hits in added.items() if pin != PIN]
    assert added[PIN] > max(wrong), added


def test_api_clients_share_the_cache_only_with_the_same_user(serve, default_model):
    url = start(serve, default_model)
    text = SECRET.format(pin=PIN)

    def hits_of(user: str | None) -> float:
        with httpx.Client(base_url=url, timeout=60) as client:
            before = value(scrape(client), HITS)
            body: dict[str, Any] = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}
            if user is not None:
                body["user"] = user
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            return value(scrape(client), HITS) - before

    assert hits_of("alice") == 0
    assert hits_of("alice") >= 48  # her own prompt again: every full block but the last token's
    assert hits_of("bob") == 0
    assert hits_of(None) == 0


def test_sessions_share_only_the_servers_own_prompt_head(serve, default_model):
    """Every /chat_stream prompt starts with the chat template's head and the server's system prompt:
    those blocks are computed once for all sessions, and nothing past them is shared. (Before, each
    session recomputed them: 45 prompt tokens a request at 16 clients against 12 over the API.)"""
    url = start(serve, default_model)

    def first_turn_hits(text: str) -> float:
        with httpx.Client(base_url=url, timeout=60) as client:  # a new session each time
            before = value(scrape(client), HITS)
            assert parse_sse(client.post("/chat_stream", json={"user_input": text}).text)[-1][0] == "done"
            return value(scrape(client), HITS) - before

    first_turn_hits(SECRET.format(pin=PIN))  # the victim
    head = first_turn_hits(SECRET.format(pin=PIN))  # another session sends the very same text
    assert head >= 16  # the head's full blocks
    assert first_turn_hits("Something else entirely, with other words in it.") == head  # the text adds nothing


# -- the block manager itself --

def _seq(tokens: list[int], salt: str | None, shared: int = 0) -> Sequence:
    return Sequence(request_id="r", token_ids=list(tokens), seed=0,
                    params=SamplingParams(cache_salt=salt, cache_shared_tokens=shared),
                    stream=None, detokenizer=None, stop_matcher=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("first, second, shared", [
    ("alice", "alice", True), ("alice", "bob", False), (None, "alice", False), (None, None, True)])
def test_blocks_are_shared_only_between_requests_with_the_same_salt(first, second, shared):
    blocks = BlockManager(16, 4)
    tokens = list(range(1, 14))  # 3 full blocks and one token
    owner = _seq(tokens, first)
    blocks.admit(owner, blocks.match_prefix(owner))
    owner.num_computed_tokens = len(tokens)
    blocks.register_computed(owner)
    blocks.free(owner)
    other = _seq(tokens, second)
    assert len(blocks.match_prefix(other)) == (3 if shared else 0)


@pytest.mark.parametrize("first, second, shared_tokens, shared_blocks", [
    ("alice", "bob", 9, 2), ("alice", "bob", 8, 2), ("alice", "bob", 7, 1), ("alice", "alice", 9, 3),
    (None, "alice", 9, 2), ("alice", "bob", 0, 0)])
def test_blocks_wholly_inside_the_shared_head_are_shared_across_salts(first, second, shared_tokens, shared_blocks):
    blocks = BlockManager(16, 4)
    tokens = list(range(1, 14))  # 3 full blocks and one token
    owner = _seq(tokens, first, shared_tokens)
    blocks.admit(owner, blocks.match_prefix(owner))
    owner.num_computed_tokens = len(tokens)
    blocks.register_computed(owner)
    blocks.free(owner)
    assert len(blocks.match_prefix(_seq(tokens, second, shared_tokens))) == shared_blocks
    # A request whose head differs (another system prompt) shares nothing.
    assert len(blocks.match_prefix(_seq([99, *tokens[1:]], second, shared_tokens))) == 0
