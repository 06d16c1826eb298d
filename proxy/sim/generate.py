"""What the simulator says: an answer composed from the corpus, then a plan.

A :class:`Plan` is the whole generation decided up front (tokens, finish
reason, stop reason), so the streaming loop only frames and sends bytes.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import corpus, tokenizer

_TOPIC_WORDS = 8
_TOPIC_CHARS = 12


@dataclass(slots=True)
class Plan:
    """The tokens one choice emits; the last one carries ``finish_reason``.

    A natural end emits a final empty token (the end-of-sequence token, which
    has no text), as vLLM does; it counts as a completion token.
    """

    pieces: list[str]
    finish_reason: str
    stop_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def rng_for(text: str, temperature: float, seed: int | None, index: int) -> random.Random:
    """Greedy is a function of the prompt; sampling varies unless seeded."""
    base = zlib.crc32(text.encode())
    if temperature <= 1e-5:
        return random.Random(base)
    if seed is not None:
        return random.Random(base * 1_000_003 + seed * 101 + index)
    return random.Random()


def _topic_intro(text: str, cjk: bool) -> str:
    if not text:
        return "Hello!"
    if cjk:
        flat = "".join(text.split())
        topic = flat[:_TOPIC_CHARS] + ("…" if len(flat) > _TOPIC_CHARS else "")
        return f"你问的是“{topic}”。"
    words = text.split()
    topic = " ".join(words[:_TOPIC_WORDS]).rstrip(".,;:!?")
    if len(words) > _TOPIC_WORDS:
        topic += "..."
    return f'You asked about "{topic}".'


def _wants(lower: str, words: Sequence[str]) -> bool:
    return any(w in lower for w in words)


def compose(prompt: str, rng: random.Random, *, chat: bool) -> tuple[list[str], bool]:
    """The natural answer to ``prompt`` as tokens, and whether it is Chinese.

    Chat answers open by echoing the start of the user's message; completions
    just continue. Poems and code come out as several lines.
    """
    text = prompt.strip()
    cjk = tokenizer.has_cjk(text)
    lower = text.lower()
    pieces: list[str] = tokenizer.split(_topic_intro(text, cjk)) if chat else []
    if _wants(lower, corpus.POEM_WORDS):
        lead = "这是一首小诗：" if cjk else " Here is a short poem:"
        body = "\n".join(rng.choice(corpus.POEMS))
        pieces += tokenizer.split(f"{lead}\n\n{body}")
        return pieces, cjk
    if not chat and _looks_like_code(text):
        # A completion continues the code itself: the snippet's body, no fences.
        body = "\n".join(line for line in rng.choice(corpus.CODE) if not line.startswith("```"))
        return tokenizer.split(f"\n    # Example:\n{body}\n"), cjk
    if _wants(lower, corpus.CODE_WORDS):
        lead = "这是一个小例子：" if cjk else " Here is a small example:"
        body = "\n".join(rng.choice(corpus.CODE))
        tail = "运行它，然后按需修改。" if cjk else "Run it and adjust it to your needs."
        pieces += tokenizer.split(f"{lead}\n\n{body}\n\n{tail}")
        return pieces, cjk
    source = corpus.CHINESE_PIECES if cjk else corpus.ENGLISH_PIECES
    target = rng.randint(26, 44)
    while len(pieces) < target:
        pieces += rng.choice(source)
    return pieces, cjk


def _looks_like_code(text: str) -> bool:
    return text.startswith(("def ", "class ", "import ", "from ", "#include", "function "))


def filler(rng: random.Random, cjk: bool) -> Callable[[], tuple[str, ...]]:
    """More sentences for generations forced past the natural answer."""
    source = corpus.CHINESE_PIECES if cjk else corpus.ENGLISH_PIECES
    return lambda: rng.choice(source)


def make_plan(
    answer: list[str],
    more: Callable[[], tuple[str, ...]],
    *,
    limit: int,
    forced: int | None = None,
    stops: Sequence[str] = (),
    include_stop: bool = False,
) -> Plan:
    """Decide the tokens of one choice.

    ``limit`` is the effective ``max_tokens`` (at least 1). ``forced`` emits
    exactly ``min(forced, limit)`` tokens (``ignore_eos`` or ``--tokens``).
    """
    if forced is not None:
        n = max(1, min(forced, limit))
        pieces = answer[:n]
        while len(pieces) < n:
            pieces += more()
        plan = Plan(pieces[:n], "length" if n >= limit else "stop")
    elif len(answer) < limit:
        plan = Plan([*answer, ""], "stop")
    else:
        plan = Plan(answer[:limit], "length")
    if stops:
        _apply_stops(plan, stops, include_stop)
    return plan


def _apply_stops(plan: Plan, stops: Sequence[str], include_stop: bool) -> None:
    """Cut at the first stop string, as vLLM does: the text before it is kept,
    the stop string itself only with ``include_stop_str_in_output``.

    A stop string may span tokens; like vLLM's detokenizer, which holds back
    text that could be the start of a stop string, the tokens keep their count
    but lose the text past the cut.
    """
    longest = max(len(s) for s in stops)
    acc = ""
    starts: list[int] = []  # offset of each piece in acc
    for i, piece in enumerate(plan.pieces):
        search_from = max(0, len(acc) - longest + 1)
        starts.append(len(acc))
        acc += piece
        found: tuple[int, str] | None = None
        for s in stops:
            at = acc.find(s, search_from)
            if at >= 0 and (found is None or at < found[0]):
                found = (at, s)
        if found is None:
            continue
        at, s = found
        end = at + len(s) if include_stop else at
        kept = [
            p if starts[j] + len(p) <= end else acc[starts[j] : max(end, starts[j])]
            for j, p in enumerate(plan.pieces[: i + 1])
        ]
        plan.pieces[:] = kept
        plan.finish_reason = "stop"
        plan.stop_reason = s
        return
