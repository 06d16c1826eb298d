"""The access log: escaping of client-controlled values, and the status of a 500."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.accesslog import escape
from proxy.front import Front
from proxy.inflight import InFlight


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("/v1/models", "/v1/models"),
        ("/a b", "/a b"),
        ("/a\nb", "/a\\x0Ab"),
        ("/a\r\x1b[31m\x00", "/a\\x0D\\x1B[31m\\x00"),
        ("/\u2028", "/\\xE2\\x80\\xA8"),
        ('/q"\\', "/q\\x22\\x5C"),
        ("/é", "/\\xC3\\xA9"),
    ],
)
def test_escape(raw: str, logged: str) -> None:
    assert escape(raw) == logged
    assert escape(raw).isprintable() and escape(raw).isascii()


def test_a_500_is_logged_with_status_500(caplog: pytest.LogCaptureFixture) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    tracker = InFlight()
    app = Starlette(routes=[Route("/boom", boom)], middleware=[Middleware(Front, tracker=tracker)])
    with caplog.at_level(logging.INFO, logger="proxy.access"):
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/boom").status_code == 500
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert len(lines) == 1 and lines[0].startswith("GET /boom 500 "), lines
    assert tracker.count == 0


def test_the_v1_front_answers_an_unexpected_error_with_json_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def boom(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            raise RuntimeError("boom")

    app = Front(boom, tracker=InFlight(), answer_errors=True)
    with caplog.at_level(logging.INFO):
        client = TestClient(app, raise_server_exceptions=True)  # not raised: answered
        response = client.post("/v1/chat/completions", content=b"{}")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "internal_error"
    assert response.headers["x-request-id"]
    access = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert len(access) == 1 and access[0].startswith("POST /v1/chat/completions 500 "), access
    assert any(r.exc_info for r in caplog.records if r.name == "proxy.front")
