"""The simulator against a real vLLM, on the same requests (``-m vllm``).

What a client could notice must match: status, content type and the header names
that matter, SSE framing, the JSON keys (and their order and value types) of every
body and chunk, and error bodies — exactly, where vLLM's message is deterministic.
Ids, timestamps, fingerprints, texts and token counts differ by nature and are
compared by shape only. If the simulator drifts from vLLM, this fails.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conformance.conftest import MODEL, Upstream
from tests.support.wire import post_raw, shape, sse_events

pytestmark = pytest.mark.vllm

CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello! How are you?"}],
    "max_tokens": 6,
    "temperature": 0,
    "ignore_eos": True,
}
COMPLETION = {
    "model": MODEL,
    "prompt": "def hello():",
    "max_tokens": 6,
    "temperature": 0,
    "ignore_eos": True,
}
USAGE = {"stream_options": {"include_usage": True}}

# Headers a client may act on; the rest (date, server, content-length values) vary.
HEADERS_THAT_MATTER = (
    "content-type",
    "vary",
    "allow",
    "www-authenticate",
    "transfer-encoding",
    "x-request-id",
)

# (name, method, path, body, with the key?)
CASES: list[tuple[str, str, str, Any, bool]] = [
    ("health", "GET", "/health", None, False),
    ("version", "GET", "/version", None, False),
    ("models", "GET", "/v1/models", None, True),
    ("chat", "POST", "/v1/chat/completions", CHAT, True),
    ("chat-stream", "POST", "/v1/chat/completions", {**CHAT, "stream": True}, True),
    ("chat-stream-usage", "POST", "/v1/chat/completions", {**CHAT, "stream": True, **USAGE}, True),
    ("chat-stop", "POST", "/v1/chat/completions", {**CHAT, "stop": ["\n"]}, True),
    (
        "chat-logprobs",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 2},
        True,
    ),
    (
        "chat-max-completion-tokens",
        "POST",
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": CHAT["messages"],
            "max_completion_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
        True,
    ),
    ("completions", "POST", "/v1/completions", COMPLETION, True),
    ("completions-stream", "POST", "/v1/completions", {**COMPLETION, "stream": True}, True),
    (
        "completions-stream-usage",
        "POST",
        "/v1/completions",
        {**COMPLETION, "stream": True, **USAGE},
        True,
    ),
    ("unknown-model", "POST", "/v1/chat/completions", {**CHAT, "model": "no-such-model"}, True),
    (
        "unknown-model-stream",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "model": "no-such-model", "stream": True},
        True,
    ),
    (
        "unknown-model-completions",
        "POST",
        "/v1/completions",
        {**COMPLETION, "model": "no-such-model"},
        True,
    ),
    (
        "malformed-json",
        "POST",
        "/v1/chat/completions",
        b'{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}',
        True,
    ),
    ("missing-messages", "POST", "/v1/chat/completions", {"model": MODEL}, True),
    (
        "messages-wrong-type",
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": "hello"},
        True,
    ),
    ("max-tokens-wrong-type", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "many"}, True),
    (
        "no-model-field",
        "POST",
        "/v1/chat/completions",
        {"messages": CHAT["messages"], "max_tokens": 3},
        True,
    ),
    ("max-tokens-too-large", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 100000}, True),
    (
        "max-tokens-too-large-stream",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "max_tokens": 100000, "stream": True},
        True,
    ),
    (
        "completions-max-tokens-too-large",
        "POST",
        "/v1/completions",
        {**COMPLETION, "max_tokens": 100000},
        True,
    ),
    (
        "prompt-plus-max-tokens-over-context",
        "POST",
        "/v1/completions",
        {**COMPLETION, "max_tokens": 510},
        True,
    ),
    ("prompt-too-long", "POST", "/v1/completions", {**COMPLETION, "prompt": "hello " * 600}, True),
    ("max-tokens-zero", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, True),
    (
        "sampled-n2-stream",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "n": 2, "temperature": 1, "seed": 7, "stream": True},
        True,
    ),
    ("stop-wrong-type", "POST", "/v1/chat/completions", {**CHAT, "stop": 5}, True),
    ("prompt-wrong-type", "POST", "/v1/completions", {**COMPLETION, "prompt": {"a": 1}}, True),
    (
        "content-wrong-type",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        True,
    ),
    (
        "temperature-wrong-type",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "temperature": "hot"},
        True,
    ),
    ("max-tokens-fraction", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 4.5}, True),
    ("logprobs-wrong-type", "POST", "/v1/chat/completions", {**CHAT, "logprobs": 5}, True),
    ("stop-bool", "POST", "/v1/chat/completions", {**CHAT, "stop": True}, True),
    ("stop-list-of-ints", "POST", "/v1/chat/completions", {**CHAT, "stop": ["a", 5]}, True),
    ("unknown-field", "POST", "/v1/chat/completions", {**CHAT, "frobnicate": 1}, True),
    ("embeddings", "POST", "/v1/embeddings", {"model": MODEL, "input": "hello"}, True),
    ("greedy-n2", "POST", "/v1/chat/completions", {**CHAT, "n": 2}, True),
    ("empty-body", "POST", "/v1/chat/completions", b"", True),
    ("unknown-path", "GET", "/v1/nope", None, True),
    ("wrong-method", "GET", "/v1/chat/completions", None, True),
    ("no-key", "GET", "/v1/models", None, False),
    ("no-key-chat", "POST", "/v1/chat/completions", CHAT, False),
    ("tokenize", "POST", "/tokenize", {"model": MODEL, "prompt": "hello"}, False),
]


def _send(
    up: Upstream, method: str, path: str, body: Any, auth: bool
) -> tuple[httpx.Response, bytes]:
    headers = dict(up.auth) if auth else {}
    if method == "GET":
        r = httpx.get(up.url + path, headers=headers, timeout=60)
        return r, r.content
    if body == b"":
        r = httpx.post(up.url + path, headers=headers, timeout=60)
        return r, r.content
    return post_raw(up.url + path, body, headers)


def _header_view(r: httpx.Response) -> tuple[list[str], dict[str, list[str]]]:
    """The header names in order, and the values of those a client may act on."""
    names = [name for name, _ in r.headers.multi_items()]
    values = {name: r.headers.get_list(name) for name in HEADERS_THAT_MATTER if name in r.headers}
    return names, values


# vLLM lists every member of a message-type union in its error (22 of them); the
# simulator gives the first two, so the same param, type and code, a shorter message.
LOOSE_MESSAGE = {"content-wrong-type"}


# vLLM interleaves the chunks of n > 1 choices as its engine happens to produce them
# (not the same from run to run): compare which chunk shapes occur, not their order.
UNORDERED = {"sampled-n2-stream"}


def _collapse(items: list[Any]) -> list[Any]:
    """Runs of equal items as one: the number of token chunks is the tokenizer's."""
    return [x for i, x in enumerate(items) if i == 0 or x != items[i - 1]]


def _body_view(r: httpx.Response, raw: bytes, name: str) -> Any:
    """What to compare of a body: error bodies exactly, others by shape."""
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        events = sse_events(raw)  # asserts vLLM's framing
        view = [e.decode() if e == b"[DONE]" else shape(json.loads(e)) for e in events]
        if name in UNORDERED:
            return sorted({json.dumps(v) for v in view})
        return _collapse(view)
    if not raw:
        return raw
    if ctype.startswith("application/json"):
        data = json.loads(raw)
        if r.status_code >= 400 and name in LOOSE_MESSAGE:
            return {"error": dict(data["error"], message="...")}
        if r.status_code >= 400:
            return data  # error bodies: exactly
        return shape(data)
    return ctype  # /metrics etc.: the type only


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "auth"), CASES, ids=[c[0] for c in CASES]
)
def test_simulator_answers_like_vllm(
    sim_upstream: Upstream,
    vllm_upstream: Upstream,
    name: str,
    method: str,
    path: str,
    body: Any,
    auth: bool,
) -> None:
    real, real_raw = _send(vllm_upstream, method, path, body, auth)
    sim, sim_raw = _send(sim_upstream, method, path, body, auth)
    assert sim.status_code == real.status_code, (real_raw[:500], sim_raw[:500])
    assert _header_view(sim) == _header_view(real)
    assert _body_view(sim, sim_raw, name) == _body_view(real, real_raw, name)
