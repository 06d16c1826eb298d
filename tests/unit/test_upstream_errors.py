"""Upstream error bodies -> the gateway's shape; /models lists (pure functions)."""

from __future__ import annotations

import pytest

from proxy.errors import upstream_error
from proxy.upstream import served_models, split_credentials

VLLM_404 = (
    b'{"error":{"message":"The model `x` does not exist.","type":"NotFoundError",'
    b'"param":"model","code":404}}'
)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, VLLM_404, ("The model `x` does not exist.", "NotFoundError", "model", "not_found")),
        (404, b'{"detail":"Not Found"}', ("Not Found", "invalid_request_error", None, "not_found")),
        (
            401,
            b'{"error":"Unauthorized"}',
            ("Unauthorized", "invalid_request_error", None, "invalid_api_key"),
        ),
        (
            500,
            b"<html>boom</html>",
            ("<html>boom</html>", "upstream_error", None, "upstream_error"),
        ),
        (502, b"", ("upstream answered 502", "upstream_error", None, "upstream_error")),
        (
            422,
            b'{"detail":[{"msg":"x"}]}',
            ('{"detail":[{"msg":"x"}]}', "invalid_request_error", None, "invalid_request"),
        ),
        (418, b"{}", ("{}", "invalid_request_error", None, "upstream_client_error")),
    ],
)
def test_upstream_error(status: int, body: bytes, expected: tuple) -> None:
    assert upstream_error(status, body) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"object":"list","data":[{"id":"a"},{"id":"b"}]}', ["a", "b"]),
        (b'{"data":[]}', []),
        (b"not json", None),
        (b'{"data":[{"name":"a"}]}', None),
        (b"[1]", None),
    ],
)
def test_served_models(body: bytes, expected: list[str] | None) -> None:
    assert served_models(body) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:8000/v1/", ("http://h:8000/v1", None)),
        ("http://u:p@h:8000/v1", ("http://h:8000/v1", "Basic dTpw")),  # u:p
        ("https://u%40x:p%3Aw@[::1]/v1", ("https://[::1]/v1", "Basic dUB4OnA6dw==")),  # u@x:p:w
        ("http://tok@h/v1", ("http://h/v1", "Basic dG9rOg==")),  # tok:
    ],
)
def test_split_credentials(url: str, expected: tuple[str, str | None]) -> None:
    assert split_credentials(url) == expected
