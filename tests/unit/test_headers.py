from __future__ import annotations

import pytest

from proxy.headers import (
    HOP_BY_HOP,
    client_response_headers,
    request_id_from,
    strip_headers,
    upstream_request_headers,
    writable,
)


def test_upstream_headers_replace_client_key_and_drop_hop_by_hop() -> None:
    client = [
        (b"host", b"gw:8001"),
        (b"authorization", b"Bearer client-secret"),
        (b"connection", b"keep-alive, x-custom-hop"),
        (b"x-custom-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"10"),
        (b"te", b"trailers"),
        (b"content-type", b"application/json"),
        (b"x-trace", b"a"),
        (b"x-trace", b"b"),
        (b"x-request-id", b"client-id"),
    ]
    out = upstream_request_headers(client, api_key=b"up-key", request_id=b"rid")
    assert out == [
        (b"content-type", b"application/json"),
        (b"x-trace", b"a"),
        (b"x-trace", b"b"),
        (b"authorization", b"Bearer up-key"),
        (b"x-request-id", b"rid"),
    ]
    assert not any(b"client-secret" in v for _, v in out)


def test_no_upstream_key_means_no_authorization() -> None:
    out = upstream_request_headers([(b"authorization", b"Bearer c")], api_key=b"", request_id=b"r")
    assert [n for n, _ in out] == [b"x-request-id"]


def test_response_headers_keep_end_to_end_and_duplicates() -> None:
    upstream = [
        (b"date", b"x"),
        (b"server", b"uvicorn"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"vary", b"Origin"),
        (b"vary", b"Accept"),
        (b"transfer-encoding", b"chunked"),
        (b"x-request-id", b"upstream-id"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    assert client_response_headers(upstream) == [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"vary", b"Origin"),
        (b"vary", b"Accept"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_every_hop_by_hop_header_is_stripped(name: bytes) -> None:
    assert strip_headers([(name, b"v"), (b"x-ok", b"1")], HOP_BY_HOP) == [(b"x-ok", b"1")]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (b"abc-123", True),
        (b"0f8fad5b-d9cb-469f-a165-70867728950e", True),
        (b"", False),
        (b"has space", False),
        (b"x" * 129, False),
        (b"evil\r\ninjected: 1", False),
    ],
)
def test_request_id_accepted_only_when_sane(given: bytes, kept: bool) -> None:
    rid = request_id_from([(b"x-request-id", given)])
    assert (rid == given) is kept
    assert 1 <= len(rid) <= 128


def test_request_id_generated_when_absent_and_unique() -> None:
    assert request_id_from([]) != request_id_from([])


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ([], True),
        ([(b"content-type", b"application/json"), (b"x-a", b"tab\tinside")], True),
        ([(b"x-bad", b"a\x01b")], False),
        ([(b"x-bad", b"a\nb")], False),
        ([(b"x-bad", b"a\x7f")], False),
        ([(b"bad name", b"v")], False),
        ([(b"bad:name", b"v")], False),
    ],
)
def test_writable(headers: list[tuple[bytes, bytes]], ok: bool) -> None:
    assert writable(headers) is ok
