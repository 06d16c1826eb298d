"""Usage reading and the include_usage add/strip, checked against real vLLM recordings."""

from __future__ import annotations

import re

import orjson
import pytest

from proxy.limits import calendar, estimate_tokens, go_duration
from proxy.usage import UsageStripper, ask_for_usage, usage_in, wants_usage
from tests.unit.test_sim_wire import load_transcript


def _ids(raw: bytes) -> bytes:
    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', rb'"\1":X', raw)


# vLLM's recorded streams without and with the usage chunk, for the same request.
RECORDED_PAIRS = [
    ("04_chat_stream.txt", "05_chat_stream_usage.txt"),
    ("07_completions_stream.txt", "07b_completions_stream_usage.txt"),
]


def strip_split(raw: bytes, cut: int | None) -> tuple[bytes, UsageStripper]:
    stripper = UsageStripper()
    parts = [raw] if cut is None else [raw[:cut], raw[cut:]]
    out = b"".join(stripper.feed(p) for p in parts) + stripper.close()
    return out, stripper


@pytest.mark.parametrize(("plain", "with_usage"), RECORDED_PAIRS)
def test_stripping_gives_the_bytes_vllm_sends_without_usage(plain: str, with_usage: str) -> None:
    want = load_transcript(plain).body
    raw = load_transcript(with_usage).body
    assert b'"usage"' in raw and _ids(raw) != _ids(want)
    for cut in [None, *range(0, len(raw), 7)]:  # every 7th byte boundary, mid-event too
        out, stripper = strip_split(raw, cut)
        assert _ids(out) == _ids(want), cut
        assert stripper.usage is not None
    prompt, completion = stripper.usage
    usage = orjson.loads(raw.split(b"\n\n")[-3][len(b"data: ") :])["usage"]
    assert (prompt, completion) == (usage["prompt_tokens"], usage["completion_tokens"])


@pytest.mark.parametrize(("plain", "with_usage"), RECORDED_PAIRS)
def test_stripping_event_by_event_as_vllm_writes_them(plain: str, with_usage: str) -> None:
    want = load_transcript(plain).body
    raw = load_transcript(with_usage).body
    events = [e + b"\n\n" for e in raw.split(b"\n\n")[:-1]]
    stripper = UsageStripper()
    out = b"".join(stripper.feed(e) for e in events) + stripper.close()
    assert _ids(out) == _ids(want)
    assert stripper.events == len(events) and stripper.usage is not None


def test_stream_without_usage_chunk_passes_unchanged() -> None:
    raw = load_transcript("04_chat_stream.txt").body
    out, stripper = strip_split(raw, len(raw) // 2)
    assert out == raw and stripper.usage is None


def test_usage_in_bodies_and_tails() -> None:
    body = load_transcript("03_chat_nonstream.txt").body
    assert usage_in(body) == (
        orjson.loads(body)["usage"]["prompt_tokens"],
        orjson.loads(body)["usage"]["completion_tokens"],
    )
    assert usage_in(b'{"usage":{"prompt_tokens":7,"total_tokens":7}}') == (7, 0)
    assert usage_in(b'{"choices":[]}') is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","stream":true}',
        b'{"model":"m","stream":true}\n',
        b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false}}',
        b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}',
    ],
)
def test_ask_for_usage(body: bytes) -> None:
    parsed = orjson.loads(body)
    assert not wants_usage(parsed)
    new = orjson.loads(ask_for_usage(body, parsed))
    assert wants_usage(new)
    assert {k: v for k, v in new.items() if k != "stream_options"} == {
        k: v for k, v in parsed.items() if k != "stream_options"
    }
    if "stream_options" not in parsed:  # the client's bytes kept, the field appended
        assert ask_for_usage(body, parsed).startswith(body.rstrip()[:-1])


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (1, "1s"),
        (9.816, "9.816s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
        (59.9999, "1m0s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_estimate() -> None:
    body = b'{"model":"m","messages":[],"max_tokens":100,"n":2}'
    parsed = orjson.loads(body)
    assert estimate_tokens(body, parsed, "/chat/completions", 50) == len(body) // 4 + 200
    assert estimate_tokens(b'{"model":"m"}', {"model": "m"}, "/completions", 50) == 3 + 50
    assert estimate_tokens(b'{"model":"m","input":"x"}', {}, "/embeddings", 50) == 6


def test_calendar_windows_end_at_utc_midnight() -> None:
    day, to_day_end, month, to_month_end = calendar(1_796_083_200.0 - 10)  # 2026-12-01 - 10 s
    assert (day, month) == ("2026-11-30", "2026-11")
    assert to_day_end == pytest.approx(10) and to_month_end == pytest.approx(10)
