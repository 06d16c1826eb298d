from __future__ import annotations

import pytest

from proxy.auth import BearerAuthMiddleware


async def _app(scope, receive, send):  # pragma: no cover - never reached in these tests
    raise AssertionError


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ([(b"authorization", b"Bearer right-key")], True),
        ([(b"authorization", b"bearer right-key")], True),
        ([(b"authorization", b"BEARER  right-key ")], True),
        ([(b"authorization", b"Bearer right-ke")], False),
        ([(b"authorization", b"Bearer right-key2")], False),
        ([(b"authorization", b"Basic cmlnaHQta2V5")], False),
        ([(b"authorization", b"right-key")], False),
        ([(b"authorization", b"Bearer ")], False),
        ([], False),
        ([(b"authorization", b"Bearer right-key"), (b"authorization", b"Bearer right-key")], False),
    ],
)
def test_check(headers: list[tuple[bytes, bytes]], ok: bool) -> None:
    mw = BearerAuthMiddleware(_app, api_key="right-key")
    problem = mw._check(headers)
    assert (problem is None) is ok
    if problem:
        assert "right-key" not in problem
