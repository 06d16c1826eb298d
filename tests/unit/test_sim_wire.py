"""The simulator's bytes against vLLM 0.32's recorded transcripts (shape, not text)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from proxy.sim import wire
from proxy.sim.generate import Plan
from tests.support.wire import shape

_ROOT = Path(__file__).resolve().parents[2]
# A copy of shared/reference/vllm-wire (recorded from vLLM 0.32.0), kept in the repo so
# these tests always run.
REFERENCE = _ROOT / "tests" / "reference" / "vllm-wire"


@dataclass
class Transcript:
    name: str
    method: str
    path: str
    request_body: bytes | None
    request_headers: list[tuple[str, str]]
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def events(self) -> list[bytes]:
        return [e[len(b"data: ") :] for e in self.body.split(b"\n\n") if e]


def load_transcript(name: str) -> Transcript:
    """Parse one ``reference/vllm-wire/*.txt`` (curl -sN -D - output plus notes)."""
    assert REFERENCE is not None
    text = (REFERENCE / name).read_text()
    first = text.splitlines()[0]
    request_headers: list[tuple[str, str]] = []
    if first.startswith("### curl"):
        request_headers = re.findall(r"-H ([\w-]+): (.+?)(?= -H | -d | http://)", first)
        words = first.split()
        url = words[-1]
        path = "/" + url.split("/", 3)[3]
        method = "POST" if " -d " in first else "GET"
        body = (
            first.split(" -d ", 1)[1].rsplit(" http", 1)[0].encode() if method == "POST" else None
        )
    else:
        method, path = first[4:].split()
        body = None
        if "### request body:\n" in text:
            body = text.split("### request body:\n", 1)[1].split("\n", 1)[0].encode()
    response = text[text.index("HTTP/1.1 ") :]
    head, _, rest = response.partition("\n\n")
    status_line, *header_lines = head.split("\n")
    headers = [(k.lower(), v) for k, _, v in (h.partition(": ") for h in header_lines)]
    return Transcript(
        name=name,
        method=method,
        path=path,
        request_body=body,
        request_headers=request_headers,
        status=int(status_line.split()[1]),
        headers=headers,
        body=rest.split("\n### curl exit", 1)[0].encode(),
    )


def test_transcript_loader_reads_bodies_exactly() -> None:
    t = load_transcript("03_chat_nonstream.txt")
    assert t.status == 200
    assert len(t.body) == int(t.header("content-length") or -1)
    assert [k for k, _ in t.headers] == [
        "date",
        "server",
        "content-length",
        "content-type",
        "vary",
    ]
    t = load_transcript("35_apikey_chat_goodkey_stream.txt")
    assert t.method == "POST" and t.path == "/v1/chat/completions"
    assert orjson.loads(t.request_body or b"")["max_tokens"] == 2
    assert t.events()[-1] == b"[DONE]"
    assert t.request_headers == [
        ("Authorization", "Bearer sk-test-123"),
        ("Content-Type", "application/json"),
    ]


def _framer(*, chat: bool, include_usage: bool) -> wire.StreamFramer:
    return wire.StreamFramer(
        chat=chat,
        rid="chatcmpl-0123456789abcdef" if chat else "cmpl-0123456789abcdef",
        created=1795483080,
        model="tiny-llama",
        fingerprint="vllm-0.32.0-0d6c034b",
        include_usage=include_usage,
    )


def _sim_stream(*, chat: bool, include_usage: bool, n_tokens: int) -> bytes:
    f = _framer(chat=chat, include_usage=include_usage)
    out = [f.role(0)] if chat else []
    out += [f.token(0, f" w{i}") for i in range(n_tokens - 1)]
    out.append(f.last(0, " end", "length", None))
    if include_usage:
        out.append(f.usage(17, n_tokens))
    out.append(wire.DONE)
    return b"".join(out)


@pytest.mark.parametrize(
    ("name", "chat", "include_usage"),
    [
        ("04_chat_stream.txt", True, False),
        ("05_chat_stream_usage.txt", True, True),
        ("07_completions_stream.txt", False, False),
        ("07b_completions_stream_usage.txt", False, True),
        ("35_apikey_chat_goodkey_stream.txt", True, False),
    ],
)
def test_stream_framing_matches_transcript(name: str, chat: bool, include_usage: bool) -> None:
    t = load_transcript(name)
    n_tokens = orjson.loads(t.request_body or b"")["max_tokens"]
    body = _sim_stream(chat=chat, include_usage=include_usage, n_tokens=n_tokens)
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    ours = [e[len(b"data: ") :] for e in body.split(b"\n\n") if e]
    theirs = t.events()
    assert len(ours) == len(theirs)
    assert ours[-1] == theirs[-1] == b"[DONE]"
    for mine, recorded in zip(ours[:-1], theirs[:-1], strict=True):
        assert shape(orjson.loads(mine)) == shape(orjson.loads(recorded))


def test_stop_reason_string_in_finish_chunk() -> None:
    t = load_transcript("21_chat_no_max_tokens_stream.txt")
    mine = _framer(chat=True, include_usage=False).last(0, "", "stop", " export")
    assert mine.startswith(b"data: ") and mine.endswith(b"}\n\n")
    recorded = orjson.loads(t.events()[1])
    assert shape(orjson.loads(mine[6:])) == shape(recorded)
    assert orjson.loads(mine[6:])["choices"][0]["stop_reason"] == " export"


def test_chunk_json_escapes_text() -> None:
    f = _framer(chat=True, include_usage=False)
    for piece in ['"quoted"', "back\\slash", "new\nline", "中文", "\u2028", "tab\t"]:
        event = f.token(0, piece)
        assert orjson.loads(event[6:-2])["choices"][0]["delta"]["content"] == piece


@pytest.mark.parametrize(
    "name", ["03_chat_nonstream.txt", "13_no_model_field.txt", "20_stop_sequence.txt"]
)
def test_chat_body_matches_transcript(name: str) -> None:
    recorded = orjson.loads(load_transcript(name).body)
    choice = recorded["choices"][0]
    plan = Plan(["x"], choice["finish_reason"], choice["stop_reason"])
    body = wire.chat_body(
        rid="chatcmpl-0123456789abcdef",
        created=1,
        model="tiny-llama",
        fingerprint="vllm-0.32.0-0d6c034b",
        plans=[plan],
        prompt_tokens=11,
    )
    assert shape(orjson.loads(body)) == shape(recorded)


def test_chat_logprobs_body_matches_transcript() -> None:
    recorded = orjson.loads(load_transcript("18_chat_logprobs.txt").body)
    body = wire.chat_body(
        rid="chatcmpl-0123456789abcdef",
        created=1,
        model="tiny-llama",
        fingerprint="f",
        plans=[Plan([" export", " export"], "length")],
        prompt_tokens=11,
        logprobs=True,
        top_logprobs=2,
    )
    assert shape(orjson.loads(body)) == shape(recorded)


def test_completion_body_matches_transcript() -> None:
    recorded = orjson.loads(load_transcript("06_completions_nonstream.txt").body)
    body = wire.completion_body(
        rid="cmpl-0123456789abcdef",
        created=1,
        model="tiny-llama",
        fingerprint="f",
        plans=[Plan(["a", "b"], "length")],
        prompt_tokens=5,
    )
    assert shape(orjson.loads(body)) == shape(recorded)


def test_models_body_matches_transcript() -> None:
    recorded = load_transcript("02_models.txt").body
    body = wire.models_body(("tiny-llama",), 512, 1795483080, ["87ea928a8bed3d6d"])
    assert shape(orjson.loads(body)) == shape(orjson.loads(recorded))
    assert len(body) == len(recorded) - len("models/")  # same bytes but the root path


def test_json_headers_order() -> None:
    t = load_transcript("15_wrong_method.txt")
    headers = wire.json_headers(b'{"detail":"Method Not Allowed"}', [(b"allow", b"POST")])
    assert [(k.decode(), v.decode()) for k, v in headers] == t.headers[2:]


def test_sse_headers_match_transcript() -> None:
    t = load_transcript("04_chat_stream.txt")
    # uvicorn adds date and server before, transfer-encoding after
    assert [(k.decode(), v.decode()) for k, v in wire.SSE_HEADERS] == t.headers[2:-1]
