"""The context a server uses when none is configured: what the model supports, capped by the KV cache."""

from __future__ import annotations

import pytest

from chatstream.service import ChatService
from chatstream.settings import Settings


def test_the_mock_gets_a_sane_context() -> None:
    service = ChatService(Settings(mock=True))
    assert service.settings.context_len == 4096


def test_a_configured_context_is_kept() -> None:
    assert ChatService(Settings(mock=True, context_len=2048)).settings.context_len == 2048
    with pytest.raises(ValueError, match="max_new_tokens"):
        Settings(context_len=256, max_new_tokens=256)


def test_the_default_model_gets_its_own_context_capped_by_the_kv_cache(default_model) -> None:
    model, tokenizer = default_model
    assert model.config.max_position_embeddings == 8192  # SmolLM2
    roomy = ChatService(Settings(kv_cache_mb=400), model=model, tokenizer=tokenizer)
    assert roomy.settings.context_len == 8192
    tight = ChatService(Settings(kv_cache_mb=16), model=model, tokenizer=tokenizer)
    engine = tight.engine
    assert tight.settings.context_len == engine.num_blocks * engine.block_size < 8192
    assert tight.settings.max_new_tokens < tight.settings.context_len
