from __future__ import annotations

import pytest

from proxy.auth import BearerAuthMiddleware
from proxy.keys import Key, Keys, KeySpec, LimitsSpec, digest


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
    mw = BearerAuthMiddleware(_app, keys=Keys.build("other-key, right-key", (), None))
    found = mw._check(headers)
    assert isinstance(found, Key) is ok
    if ok:
        assert found.name == "env-2" and found.admin
    else:
        assert "right-key" not in found


def test_file_keys_and_expiry() -> None:
    specs = [
        KeySpec("team-a", digest("a-key")),
        KeySpec("old", digest("old-key"), expires=1.0),
    ]
    mw = BearerAuthMiddleware(_app, keys=Keys.build("", specs, LimitsSpec()))
    found = mw._check([(b"authorization", b"Bearer a-key")])
    assert isinstance(found, Key) and found.name == "team-a" and not found.admin
    assert mw._check([(b"authorization", b"Bearer old-key")]) == "API key 'old' has expired"
