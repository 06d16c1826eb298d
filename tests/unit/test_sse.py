"""SSE framing: the /chat encoder and the incremental decoder, split at every byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import DONE, Event, EventTooLarge, SSEDecoder, encode_data, normalize_newlines


def feed_all(pieces: list[bytes]) -> list[Event]:
    decoder = SSEDecoder()
    return [event for piece in pieces for event in decoder.feed(piece)]


def splits(raw: bytes, step: int = 1) -> list[list[bytes]]:
    """The stream whole, one byte at a time, and cut in two at every position."""
    out = [[raw], [raw[i : i + 1] for i in range(len(raw))]]
    out += [[raw[:i], raw[i:]] for i in range(1, len(raw), step)]
    return out


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("Hello", b"data: Hello\n\n"),
        (" world", b"data:  world\n\n"),
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("\n", b"data: \ndata: \n\n"),
        ("a\r\nb\rc", b"data: a\ndata: b\ndata: c\n\n"),
        ("你好", "data: 你好\n\n".encode()),
    ],
)
def test_encode_data_one_line_per_line(text: str, wire: bytes) -> None:
    assert encode_data(text) == wire
    assert feed_all([wire]) == [Event(normalize_newlines(text))]


def test_hidden_event_skips_line_readers_but_not_parsers() -> None:
    wire = encode_data('{"a":1}', "usage", hide_from_line_readers=True)
    assert wire == b'event: usage\ndata:{"a":1}\n\n'
    assert not any(line.startswith(b"data: ") for line in wire.split(b"\n"))
    assert feed_all([wire]) == [Event('{"a":1}', "usage")]
    # A leading space would be eaten without the separator space: it is kept then.
    assert feed_all([encode_data(" x", "usage", hide_from_line_readers=True)])[0].data == " x"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"data: x\r\n\r\n", [Event("x")]),
        (b"data: a\r\ndata: b\r\n\r\n", [Event("a\nb")]),  # CRLF split: one event
        (b"data: x\r\rdata: y\n\n", [Event("x"), Event("y")]),
        (b": comment\ndata: x\n\n", [Event("x")]),
        (b"event: usage\ndata:{}\nid: 7\n\n", [Event("{}", "usage", "7")]),
        (b"event: nothing\n\ndata: y\n\n", [Event("y")]),  # no data: not dispatched
        (b"data\n\n", [Event("")]),  # a field with no colon has an empty value
        (b"\xef\xbb\xbfdata: bom\n\n", [Event("bom")]),
        (b"data: incomplete\n", []),  # no blank line yet: no event
        (DONE, [Event("[DONE]")]),
    ],
)
def test_decoder_rules_hold_at_every_split(raw: bytes, expected: list[Event]) -> None:
    for pieces in splits(raw):
        assert feed_all(pieces) == expected, pieces


def test_utf8_split_inside_a_character_is_not_lost() -> None:
    raw = "data: 机器学习 🚀\n\n".encode()
    for pieces in splits(raw):
        assert feed_all(pieces) == [Event("机器学习 🚀")]


texts = st.lists(
    st.sampled_from(["\n", "\r\n", "\r", " ", "data: ", ":", "[DONE]", "é", "你", "🚀"])
    | st.text(st.characters(codec="utf-8"), max_size=3),
    max_size=8,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(texts, max_size=5), st.data())
def test_round_trip_any_text_any_split(chunks: list[str], data: st.DataObject) -> None:
    raw = b"".join(encode_data(t) for t in chunks) + DONE
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=8)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    events = feed_all(pieces)
    assert [e.data for e in events] == [*(normalize_newlines(t) for t in chunks), "[DONE]"]
    # and byte by byte
    assert feed_all([raw[i : i + 1] for i in range(len(raw))]) == events


def test_a_line_that_never_ends_is_refused_past_the_limit() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    decoder.feed(b"data: " + b"x" * 900)
    with pytest.raises(EventTooLarge):
        decoder.feed(b"x" * 200)


def test_an_event_of_many_lines_is_refused_past_the_limit() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            decoder.feed(b"data: " + b"y" * 50 + b"\n")


def test_events_under_the_limit_pass_however_they_are_cut() -> None:
    event = b"data: " + b"z" * 900 + b"\r\n\r\n"
    for pieces in splits(event * 3, step=97):
        decoder = SSEDecoder(max_event_bytes=1000)
        events = [e for piece in pieces for e in decoder.feed(piece)]
        assert [e.data for e in events] == ["z" * 900] * 3
