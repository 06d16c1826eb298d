"""The cache's pure parts: what is reproducible, Cache-Control, the stored encoding, the
recorder's verdicts, and ``[cache]`` in the configuration file."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cache import CacheSpec, Recorder, Stored, cache_control, reproducible
from proxy.configfile import ConfigFileError, load
from proxy.errors import BadRequest
from proxy.idempotency import check_key


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/chat/completions", {"temperature": 0}, True),
        ("/chat/completions", {"temperature": 0.0, "n": 1}, True),
        ("/chat/completions", {"temperature": 0.7, "seed": 3}, True),
        ("/completions", {"seed": 0}, True),
        ("/embeddings", {"input": "x"}, True),
        ("/chat/completions", {}, False),  # vLLM's default temperature is 1
        ("/chat/completions", {"temperature": 0.7}, False),
        ("/chat/completions", {"temperature": 0, "n": 2}, False),
        ("/completions", {"temperature": 0, "best_of": 3}, False),
        ("/chat/completions", {"temperature": False}, False),
        ("/chat/completions", {"seed": True}, False),
        ("/chat/completions", {"seed": "3"}, False),
        ("/responses", {"temperature": 0}, False),
        ("/models", {}, False),
        ("/chat/completions", None, False),
    ],
)
def test_reproducible(path, body, expected):
    assert reproducible(path, body) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (False, False)),
        (b"no-cache", (True, False)),
        (b"No-Store", (False, True)),
        (b"max-age=0, no-cache, no-store", (True, True)),
        (b"no-transform", (False, False)),
    ],
)
def test_cache_control(value, expected):
    headers = [] if value is None else [(b"cache-control", value)]
    assert cache_control(headers) == expected


def test_stored_round_trip_keeps_bytes_and_headers():
    stored = Stored(
        200, [(b"content-type", b"text/event-stream"), (b"x-y", b"\xe9")], b"a\nb\0", 5.5
    )
    again = Stored.decode(stored.encode())
    assert again == stored
    assert Stored.decode(b"garbage") is None
    assert Stored.decode(b'{"s": 200}\nbody') is None


async def _run(recorder: Recorder, messages: list[dict]) -> list[dict]:
    for m in messages:
        await recorder(m)
    return messages


def _recorder(limit: int = 100) -> tuple[Recorder, list[dict]]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    return Recorder(send, limit, [(b"x-cache", b"MISS")]), sent


START_SSE = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/event-stream"),
        (b"x-ratelimit-limit-requests", b"5"),
        (b"date", b"now"),
    ],
}


def body(data: bytes, more: bool) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("messages", "limit", "stored"),
    [
        ([START_SSE, body(b"data: 1\n\n", True), body(b"data: [DONE]\n\n", False)], 100, True),
        ([START_SSE, body(b"data: 1\n\n", True)], 100, False),  # never ended: cut or left
        ([START_SSE, body(b"data: 1\n\n", False)], 100, False),  # ended without [DONE]
        ([START_SSE, body(b"data: 1\n\n", True), body(b"data: [DONE]\n\n", False)], 10, False),
        ([{**START_SSE, "status": 500}, body(b"data: [DONE]\n\n", False)], 100, False),
        (
            [
                {**START_SSE, "headers": [(b"cache-control", b"private, no-store")]},
                body(b"data: [DONE]\n\n", False),
            ],
            100,
            False,
        ),
    ],
    ids=["complete", "unfinished", "no-done", "too-big", "error", "upstream-no-store"],
)
async def test_recorder_keeps_only_complete_answers(messages, limit, stored):
    recorder, sent = _recorder(limit)
    await _run(recorder, [dict(m) for m in messages])
    result = recorder.result()
    assert (result is not None) is stored
    assert (b"x-cache", b"MISS") in sent[0]["headers"]
    if result is not None:
        assert result.body == b"data: 1\n\ndata: [DONE]\n\n"
        assert result.headers == [(b"content-type", b"text/event-stream")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("value", [b"", b"x" * 256, b"has space", b"\xe9t\xe9"])
def test_bad_idempotency_keys(value):
    with pytest.raises(BadRequest):
        check_key(value)


def test_good_idempotency_key():
    assert check_key(b"order-42:retry") == "order-42:retry"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


def test_cache_section(tmp_path):
    config = load(write(tmp_path, "[cache]\nenabled = true\nshared = true\nmax_bytes = 4096\n"), {})
    assert config.cache == CacheSpec(
        enabled=True, shared=True, max_bytes=4096, max_entry_bytes=2048
    )
    assert load(write(tmp_path, ""), {}).cache is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[cache]\nenabled = "yes"', 'cache.enabled: expected true or false, got "yes"'),
        ("[cache]\nmax_bytes = 10", "cache.max_bytes: expected an integer >= 1024, got 10"),
        ("[cache]\nttl = 0", "cache.ttl: expected a number >= 1.0, got 0"),
        ("[cache]\nmax_entry_bytes = 4096\nmax_bytes = 2048", "cache.max_entry_bytes: must not"),
        ("[cache]\nenable = true", "cache.enable: unknown key"),
    ],
)
def test_bad_cache_section(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigFileError) as err:
        load(path, {})
    assert message in str(err.value) and "\n" not in str(err.value)
