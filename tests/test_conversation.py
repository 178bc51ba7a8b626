"""ChatPrompt with the default model's real tokenizer and chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from chatstream import ChatPrompt, PromptTooLongError
from chatstream.model_loader import resolve_model_folder


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_folder(), local_files_only=True)


def conversation(tokenizer, turns: int, system: str | None = "Be brief.") -> ChatPrompt:
    prompt = ChatPrompt(tokenizer=tokenizer, system=system)
    for i in range(turns):
        prompt.add_requester_msg(f"question {i}: " + "lorem ipsum " * 20)
        prompt.add_responder_msg(f"answer {i}: " + "dolor sit amet " * 20)
    prompt.add_requester_msg("the newest question")
    return prompt


def test_renders_with_the_tokenizers_chat_template(tokenizer):
    prompt = ChatPrompt(tokenizer=tokenizer, system="You are terse.")
    prompt.add_requester_msg("Hi")
    text = tokenizer.decode(prompt.render_ids(1000))
    assert text == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_fits_by_dropping_oldest_whole_turns_keeping_system_and_newest(tokenizer):
    prompt = conversation(tokenizer, turns=8)
    full = len(prompt.render_ids(100_000))
    budget = full // 2
    ids = prompt.render_ids(budget)
    assert len(ids) <= budget
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nthe newest question<|im_end|>\n<|im_start|>assistant\n")
    assert "question 0" not in text and "question 7" in text and "answer 7" in text
    # Whole turns only: every kept question still has its answer, none is cut.
    kept = [i for i in range(8) if f"question {i}:" in text]
    assert kept == list(range(kept[0], 8))
    assert all(f"answer {i}: " + "dolor sit amet " * 19 + "dolor sit amet" in text for i in kept)
    # The stored history is not touched by truncation.
    assert len(prompt.messages) == 17


def test_too_long_even_alone_raises(tokenizer):
    prompt = conversation(tokenizer, turns=0)
    with pytest.raises(PromptTooLongError):
        prompt.render_ids(5)


def test_round_trips_as_plain_data_only(tokenizer):
    prompt = conversation(tokenizer, turns=2)
    data = prompt.to_dict()
    assert data == {"system": "Be brief.", "messages": prompt.messages}
    again = ChatPrompt.from_dict(data, tokenizer=tokenizer)
    assert again.create_prompt() == prompt.create_prompt()
    # Junk in stored data is dropped, not trusted.
    junk = ChatPrompt.from_dict({"messages": [{"role": "hacker", "content": "x"}, {"role": "user"}, "str"]})
    assert junk.messages == []


def test_messages_keep_the_fields_the_ui_stores(tokenizer):
    stored = {"messages": [
        {"role": "user", "content": "q", "branches": [[{"role": "user", "content": "an earlier version"},
                                                        {"role": "assistant", "content": "its reply"}]]},
        {"role": "assistant", "content": "a", "details": {"finish_reason": "stop", "completion_tokens": 3},
         "alternatives": ["older"], "version": 0},
    ]}
    again = ChatPrompt.from_dict(stored, tokenizer=tokenizer)
    assert again.to_dict()["messages"] == stored["messages"]
    assert again.kept_messages() == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_a_reply_in_progress_carries_the_earlier_answers_of_a_regenerate(tokenizer):
    prompt = conversation(tokenizer, turns=1)
    prompt.add_responder_msg("first")
    prompt.clear_last_responder_message()
    prompt.add_responder_msg("second")
    prompt.clear_last_responder_message()
    # What a checkpoint stores while the third answer streams: both earlier answers, nothing consumed.
    assert prompt.reply_message("thi") == {"role": "assistant", "content": "thi", "alternatives": ["first", "second"]}
    assert prompt.messages[-1]["role"] == "user"  # nothing was consumed or added
    prompt.add_responder_msg("third")
    assert prompt.messages[-1] == {"role": "assistant", "content": "third", "alternatives": ["first", "second"]}


def test_regenerate_helpers(tokenizer):
    prompt = conversation(tokenizer, turns=1)
    assert prompt.clear_last_responder_message() is False  # last is a user turn
    prompt.add_responder_msg("latest")
    assert prompt.get_responder_last_msg() == "latest"
    assert prompt.clear_last_responder_message() is True
    assert prompt.get_requester_last_msg() == "the newest question"


def test_a_custom_prompt_class_renders_its_own_format(tokenizer):
    class Plain(ChatPrompt):
        def render(self, messages, add_generation_prompt=True):
            body = "".join(f"{m['role'].upper()}: {m['content']}\n" for m in messages)
            return body + ("ASSISTANT:" if add_generation_prompt else "")

    prompt = Plain(tokenizer=tokenizer)
    prompt.add_requester_msg("Hi")
    assert tokenizer.decode(prompt.render_ids(100)) == "USER: Hi\nASSISTANT:"
    assert prompt.create_prompt() == "USER: Hi\n"


def test_an_edit_keeps_the_replaced_version_with_its_replies_and_the_model_sees_only_the_one_in_use(tokenizer):
    prompt = ChatPrompt(tokenizer=tokenizer)
    for text in ("one", "two", "three"):
        prompt.add_requester_msg(text)
        prompt.add_responder_msg(f"re {text}")
    prompt.set_last_reply_details({"finish_reason": "stop", "completion_tokens": 3, "evil": "<x>"})

    prompt.edit_user_message(2, "two, again")
    prompt.add_responder_msg("re two, again")
    assert [m["content"] for m in prompt.messages] == ["one", "re one", "two, again", "re two, again"]
    assert "re three" not in tokenizer.decode(prompt.render_ids(1000))

    restored = ChatPrompt.from_dict(prompt.to_dict(), tokenizer=tokenizer)  # the versions survive as plain data
    restored.select_version(2, 0)
    assert [m["content"] for m in restored.messages] == ["one", "re one", "two", "re two", "three", "re three"]
    assert restored.messages[5]["details"] == {"finish_reason": "stop", "completion_tokens": 3}  # unknown keys dropped
    assert "two, again" not in tokenizer.decode(restored.render_ids(1000))
    restored.select_version(2, 1)
    assert [m["content"] for m in restored.messages] == ["one", "re one", "two, again", "re two, again"]
    with pytest.raises(IndexError):
        restored.select_version(2, 2)
