"""RESP packing and parsing for the limit calls' own Redis connection."""

from __future__ import annotations

import pytest

from proxy.state.resp import ReplyError, pack, parse


def test_pack_writes_an_array_of_bulk_strings() -> None:
    assert pack("EVALSHA", b"ab\r\n", 0, 1.5) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$4\r\nab\r\n\r\n$1\r\n0\r\n$3\r\n1.5\r\n"
    )


REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nhe\r\no\r\n", b"he\r\no"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*3\r\n:1\r\n$2\r\nab\r\n*1\r\n+x\r\n", [1, b"ab", [b"x"]]),
    (b"*-1\r\n", None),
]


@pytest.mark.parametrize(("raw", "value"), REPLIES)
def test_parse_reads_each_reply_whole_and_nothing_before(raw: bytes, value: object) -> None:
    assert parse(raw) == (value, len(raw))
    for cut in range(len(raw)):  # a reply split across reads: incomplete until its end
        assert parse(raw[:cut]) is None


def test_parse_reads_consecutive_replies_from_an_offset() -> None:
    raw = b"".join(r for r, _ in REPLIES)
    pos, values = 0, []
    while pos < len(raw):
        value, pos = parse(bytearray(raw), pos)  # type: ignore[misc]
        values.append(value)
    assert values == [v for _, v in REPLIES]


def test_an_error_reply_is_returned_not_raised() -> None:
    value, end = parse(b"-NOSCRIPT No matching script\r\n+OK\r\n")  # type: ignore[misc]
    assert isinstance(value, ReplyError) and str(value).startswith("NOSCRIPT")
    assert parse(b"-NOSCRIPT No matching script\r\n+OK\r\n", end) == (b"OK", end + 5)


def test_garbage_is_refused() -> None:
    with pytest.raises(ReplyError):
        parse(b"?what\r\n")
