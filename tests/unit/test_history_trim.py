"""The pure parts of history trimming: the prompts tried, longest first, and the bound."""

from __future__ import annotations

from proxy.history import candidates, check_id, created_ms, estimate, new_id


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_candidates_drop_whole_oldest_turns_and_keep_the_system_message() -> None:
    sys_ = m("system", "be brief")
    stored = [sys_, m("user", "u1"), m("assistant", "a1"), m("user", "u2"), m("assistant", "a2")]
    new = [m("user", "u3")]
    got = candidates(stored, new)
    assert got == [
        [*stored, *new],
        [sys_, m("user", "u2"), m("assistant", "a2"), *new],
        [sys_, *new],
    ]


def test_candidates_without_history_is_just_the_new_messages() -> None:
    new = [m("system", "s"), m("user", "u")]
    assert candidates([], new) == [new]


def test_estimate_is_an_upper_bound_that_grows_with_content() -> None:
    short, long = [m("user", "hi")], [m("user", "hi " * 100)]
    assert estimate(long) > estimate(short) >= 2
    assert estimate([m("user", "日本語")]) >= 9  # UTF-8 bytes, not characters


def test_ids_carry_their_creation_time_and_are_checked() -> None:
    cid = new_id(1_700_000_000.123)
    assert check_id(cid) == cid
    assert created_ms(cid) == 1_700_000_000_123
    assert new_id() != new_id()
