from __future__ import annotations

import email.utils

import pytest

from proxy.retry import RetryPolicy, parse_retry_after, should_retry_status


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (502, None, True),
        (503, None, True),
        (504, None, True),
        (429, 1.0, True),
        (429, None, False),
        (500, None, False),
        (400, None, False),
        (404, 2.0, False),
        (200, None, False),
    ],
)
def test_which_statuses_are_retried(status: int, retry_after: float | None, expected: bool) -> None:
    assert should_retry_status(status, retry_after) is expected


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    p = RetryPolicy(max_retries=5, backoff=0.5, backoff_max=3.0)
    top = [p.backoff_delay(i, rng=lambda: 1.0) for i in range(5)]
    assert top == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert [p.backoff_delay(i, rng=lambda: 0.0) for i in range(5)] == [0.0] * 5
    assert p.backoff_delay(1, rng=lambda: 0.5) == 0.5


def test_retry_after_is_honoured_within_the_cap() -> None:
    p = RetryPolicy(retry_after_max=5.0)
    assert p.delay(0, 2.0) == 2.0
    assert p.delay(0, 600.0) == 5.0
    assert p.delay(3, 0.0) == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"3", 3.0), (b" 0 ", 0.0), (b"abc", None), (b"-1", None), (None, None)],
)
def test_parse_retry_after_seconds(value: bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    when = email.utils.formatdate(now + 7, usegmt=True).encode()
    assert parse_retry_after(when, now=now) == pytest.approx(7.0, abs=1.0)
    past = email.utils.formatdate(now - 100, usegmt=True).encode()
    assert parse_retry_after(past, now=now) == 0.0
