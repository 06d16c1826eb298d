"""A word-ish tokenizer: deterministic, reversible, cheap.

A token is a word with its leading space (`` hello``), a number of up to three
digits, one CJK character, one other symbol with an optional leading space, a
newline, or a run of other whitespace. ``"".join(split(text)) == text`` always
holds, so counts and generated text agree.
"""

from __future__ import annotations

import re
import zlib

_CJK = r"\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_PIECE = re.compile(
    rf" ?[A-Za-z]+(?:'[A-Za-z]+)?"
    rf"| ?[0-9]{{1,3}}"
    rf"|[{_CJK}]"
    rf"| ?[^\sA-Za-z0-9{_CJK}]"
    rf"|\n"
    rf"|[^\S\n]+"
)
_HAS_CJK = re.compile(rf"[{_CJK}]")

VOCAB_SIZE = 32000
BOS_ID = 1
# Chat template ids: <|start|> role <|sep|> ... <|end|> "\n"
_START, _SEP, _END, _NL = 31990, 31991, 31992, 13
_ROLE_IDS = {"system": 31993, "user": 31994, "assistant": 31995, "tool": 31996}
_OTHER_ROLE = 31997

# Template overhead in tokens, like a real chat template: a fixed part (BOS plus
# the assistant generation prompt) and a part per message.
CHAT_FIXED_OVERHEAD = 5
CHAT_MESSAGE_OVERHEAD = 5


def split(text: str) -> list[str]:
    """Split ``text`` into tokens (pieces of text that concatenate back to it)."""
    return _PIECE.findall(text)


def count(text: str) -> int:
    return len(_PIECE.findall(text))


def has_cjk(text: str) -> bool:
    return _HAS_CJK.search(text) is not None


def token_id(piece: str) -> int:
    """A stable id in ``[100, VOCAB_SIZE - 100)``, the same in every process."""
    return 100 + zlib.crc32(piece.encode()) % (VOCAB_SIZE - 200)


def encode(text: str) -> list[int]:
    return [token_id(p) for p in split(text)]


def encode_chat(messages: list[tuple[str, str]]) -> list[int]:
    """Token ids of ``(role, text)`` messages through the simulated chat template.

    ``len(encode_chat(m)) == chat_prompt_tokens(m)``.
    """
    ids = [BOS_ID]
    for role, text in messages:
        ids += [_START, _ROLE_IDS.get(role, _OTHER_ROLE), _SEP]
        ids += encode(text)
        ids += [_END, _NL]
    ids += [_START, _ROLE_IDS["assistant"], _SEP, _NL]
    return ids


def chat_prompt_tokens(messages: list[tuple[str, str]]) -> int:
    return CHAT_FIXED_OVERHEAD + sum(CHAT_MESSAGE_OVERHEAD + count(t) for _, t in messages)
