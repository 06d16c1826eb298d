from __future__ import annotations

import pytest

from proxy.sim import tokenizer

TEXTS = [
    "",
    "hi",
    "Hello! How are you?",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n  indented",
    "numbers 1234567 and 3.14",
    "café naïve Ünïcödé",
    "你好，请介绍一下你自己。",
    "mixed 中文 and English, 混合!",
    "emoji 🎉🚀 tabs\tand\r\nCRLF",
    'code: def f(x):\n    return {"a": [1, 2]}',
]


@pytest.mark.parametrize("text", TEXTS)
def test_split_round_trips(text: str) -> None:
    assert "".join(tokenizer.split(text)) == text


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("hi", ["hi"]),
        ("Hello world", ["Hello", " world"]),
        ("Hello! How are you?", ["Hello", "!", " How", " are", " you", "?"]),
        ("a\nb", ["a", "\n", "b"]),
        ("你好", ["你", "好"]),
        ("don't stop", ["don't", " stop"]),
        ("12345", ["123", "45"]),
    ],
)
def test_split_pieces(text: str, pieces: list[str]) -> None:
    assert tokenizer.split(text) == pieces
    assert tokenizer.count(text) == len(pieces)


def test_token_ids_are_stable_and_in_vocab() -> None:
    ids = tokenizer.encode("Hello world, hello world")
    assert ids == tokenizer.encode("Hello world, hello world")
    assert all(100 <= i < tokenizer.VOCAB_SIZE for i in ids)
    assert ids[1] == ids[4]  # " world" twice
    assert tokenizer.token_id(" world") == ids[1]


@pytest.mark.parametrize(
    "messages",
    [
        [("user", "hi")],
        [("system", "You are helpful."), ("user", "Hello! How are you?")],
        [("user", "a"), ("assistant", "b"), ("user", "你好")],
        [("tool", "")],
    ],
)
def test_chat_template_count_matches_ids(messages: list[tuple[str, str]]) -> None:
    ids = tokenizer.encode_chat(messages)
    assert len(ids) == tokenizer.chat_prompt_tokens(messages)
    assert ids[0] == tokenizer.BOS_ID


def test_chat_overhead_matches_recorded_vllm_for_hi() -> None:
    # reference/vllm-wire/13_no_model_field.txt: one user message "hi" -> 11 prompt tokens
    assert tokenizer.chat_prompt_tokens([("user", "hi")]) == 11


def test_has_cjk() -> None:
    assert tokenizer.has_cjk("写一首诗")
    assert not tokenizer.has_cjk("write a poem")
