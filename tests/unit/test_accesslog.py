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

from proxy.accesslog import AccessLogMiddleware, escape


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

    app = Starlette(routes=[Route("/boom", boom)], middleware=[Middleware(AccessLogMiddleware)])
    with caplog.at_level(logging.INFO, logger="proxy.access"):
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/boom").status_code == 500
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert len(lines) == 1 and lines[0].startswith("GET /boom 500 "), lines
