from __future__ import annotations

import random

import pytest

from proxy.sim import tokenizer
from proxy.sim.generate import compose, filler, make_plan, rng_for


def plan_for(prompt: str, *, limit: int = 4000, chat: bool = True, **kw: object):
    rng = rng_for(prompt, 0.0, None, 0)
    answer, cjk = compose(prompt, rng, chat=chat)
    return make_plan(answer, filler(rng, cjk), limit=limit, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "prompt",
    ["Hello! How are you?", "What is the capital of France?", "hi", "", "Tell me about rivers"],
)
def test_natural_answer_reads_like_text_and_ends_with_stop(prompt: str) -> None:
    plan = plan_for(prompt)
    assert plan.finish_reason == "stop"
    assert plan.stop_reason is None
    assert plan.pieces[-1] == ""  # the end-of-sequence token carries no text
    assert 30 <= len(plan.pieces) <= 60
    text = plan.text
    assert text.endswith((".", "!", "?"))
    if prompt:
        assert text.startswith("You asked about")
        assert prompt.split()[0] in text


def test_greedy_is_deterministic_and_depends_on_prompt() -> None:
    assert plan_for("Tell me a story").pieces == plan_for("Tell me a story").pieces
    assert plan_for("Tell me a story").pieces != plan_for("Tell me a joke").pieces


def test_sampling_varies_unless_seeded() -> None:
    def text(seed: int | None, index: int = 0) -> str:
        rng = rng_for("hi", 1.0, seed, index)
        return "".join(compose("hi", rng, chat=True)[0])

    assert text(7) == text(7)
    assert text(7, 0) != text(7, 1) or text(7, 0) != text(7, 2)
    assert len({text(None) for _ in range(8)}) > 1


def test_poem_is_multi_line() -> None:
    text = plan_for("Write a short poem about the sea").text
    assert text.count("\n") >= 4
    assert "\n\n" in text


def test_code_request_gives_fenced_code() -> None:
    text = plan_for("Write a Python function that adds two numbers").text
    assert "```python\n" in text
    assert "\n```" in text


def test_chinese_prompt_gets_chinese_answer() -> None:
    plan = plan_for("你好，请介绍一下你自己")
    assert tokenizer.has_cjk(plan.text)
    assert "你好" in plan.text
    assert plan.finish_reason == "stop"


def test_completion_continues_without_echo() -> None:
    text = plan_for("The weather today is", chat=False).text
    assert not text.startswith("You asked")
    assert text.startswith(" ")


def test_max_tokens_cuts_with_length() -> None:
    plan = plan_for("hi", limit=5)
    assert len(plan.pieces) == 5
    assert plan.finish_reason == "length"
    assert all(plan.pieces)


def test_limit_equal_to_answer_still_length() -> None:
    full = plan_for("hi")
    n_text = len(full.pieces) - 1
    assert plan_for("hi", limit=n_text).finish_reason == "length"
    assert plan_for("hi", limit=n_text + 1).finish_reason == "stop"


@pytest.mark.parametrize(
    ("forced", "limit", "n", "reason"),
    [
        (100, 500, 100, "stop"),
        (100, 40, 40, "length"),
        (3, 3, 3, "length"),
        (1000, 2000, 1000, "stop"),
    ],
)
def test_forced_length(forced: int, limit: int, n: int, reason: str) -> None:
    plan = plan_for("hi", limit=limit, forced=forced)
    assert len(plan.pieces) == n
    assert plan.finish_reason == reason
    assert all(plan.pieces)  # no end-of-sequence token when the length is forced


def test_stop_string_cuts_before_it() -> None:
    plan = plan_for("hi", stops=["asked"])
    assert plan.text == "You "
    assert plan.finish_reason == "stop"
    assert plan.stop_reason == "asked"
    assert plan.pieces == ["You", " "]


def test_stop_string_included_on_request() -> None:
    plan = plan_for("hi", stops=["asked"], include_stop=True)
    assert plan.text == "You asked"


def test_stop_string_spanning_tokens() -> None:
    plan = plan_for("hi", stops=["asked about"])
    assert plan.text == "You "
    assert plan.stop_reason == "asked about"
    assert plan.pieces == ["You", " ", ""]  # three tokens were generated


def test_first_of_several_stop_strings_wins() -> None:
    plan = plan_for("hi", stops=["about", "You"])
    assert plan.text == ""
    assert plan.stop_reason == "You"
    assert len(plan.pieces) == 1


def test_stop_string_absent_changes_nothing() -> None:
    assert plan_for("hi", stops=["@@@"]).pieces == plan_for("hi").pieces


def test_filler_never_runs_dry() -> None:
    more = filler(random.Random(1), False)
    assert all(more() for _ in range(100))
