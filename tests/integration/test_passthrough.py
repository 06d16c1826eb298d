"""The /v1/* relay against the simulated vLLM, both real servers on loopback."""

from __future__ import annotations

import asyncio
import re
import socket

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, Sim
from tests.support.servers import ServerProcess, gateway_server
from tests.support.streams import check_streams_incrementally

CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello! How are you?"}],
    "max_tokens": 12,
    "temperature": 0,
}
_VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


def _normalise(raw: bytes) -> bytes:
    """Ids and timestamps differ per request; everything else must match byte for byte."""
    return _VOLATILE.sub(rb'"\1":X', raw)


def _raw_stream(
    url: str, body: dict, headers: dict | None = None
) -> tuple[httpx.Response, list[bytes]]:
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json=body, headers=headers or {}) as r:
            return r, list(r.iter_raw())


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
@pytest.mark.parametrize("usage", [False, True])
def test_streamed_bytes_equal_upstream_bytes(
    gateway: ServerProcess, clean_sim: Sim, path: str, usage: bool
) -> None:
    body = dict(CHAT, stream=True)
    if path == "/completions":
        body = {
            "model": MODEL,
            "prompt": "def hello():",
            "max_tokens": 9,
            "temperature": 0,
            "stream": True,
        }
    if usage:
        body["stream_options"] = {"include_usage": True}
    direct, direct_chunks = _raw_stream(clean_sim.base_url + path, body)
    via, via_chunks = _raw_stream(gateway.url + "/v1" + path, body)
    assert via.status_code == direct.status_code == 200
    assert (
        via.headers["content-type"]
        == direct.headers["content-type"]
        == "text/event-stream; charset=utf-8"
    )
    assert _normalise(b"".join(via_chunks)) == _normalise(b"".join(direct_chunks))
    assert b"".join(via_chunks).endswith(b"data: [DONE]\n\n")
    assert (b'"usage"' in b"".join(via_chunks)) is usage


def test_non_streaming_body_and_headers_pass_through(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    direct = httpx.post(clean_sim.base_url + "/chat/completions", json=CHAT, timeout=30)
    via = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert via.status_code == 200
    assert _normalise(via.content) == _normalise(direct.content)
    assert via.headers["content-type"] == "application/json"
    assert via.headers["content-length"] == str(len(via.content))
    assert via.headers.get_list("vary") == direct.headers.get_list("vary")
    assert len(via.headers.get_list("server")) == 1  # ours only, not the upstream's too


def _gateway_ms(response: httpx.Response) -> float:
    (value,) = response.headers.get_list("server-timing")
    m = re.fullmatch(r"gateway;dur=(\d+\.\d+)", value)
    assert m, value
    return float(m.group(1))


def test_server_timing_gives_the_gateway_time_without_the_upstream_wait(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    assert _gateway_ms(httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=30)) >= 0
    # The upstream holds the answer for 1 s: the request takes that long, the gateway's own
    # share does not include it.
    headers = {"x-sim-first-byte-delay": "1"}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert r.status_code == 200
    assert r.elapsed.total_seconds() >= 1.0
    assert _gateway_ms(r) < 1000
    # A stream's header goes out before the body, so it carries no Server-Timing.
    response, _ = _raw_stream(gateway.url + "/v1/chat/completions", dict(CHAT, stream=True))
    assert "server-timing" not in response.headers


def test_chunks_arrive_incrementally(gateway: ServerProcess, clean_sim: Sim) -> None:
    """The first chunk reaches the client while the upstream is still generating."""
    check_streams_incrementally(gateway.url + "/v1/chat/completions", clean_sim, CHAT)


def test_request_id_is_accepted_forwarded_and_returned(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=CHAT,
        headers={"X-Request-Id": "trace-42"},
        timeout=30,
    )
    assert r.headers["x-request-id"] == "trace-42"
    assert clean_sim.stats()["request_ids"][-1] == "trace-42"
    r2 = httpx.get(gateway.url + "/v1/models", timeout=10)
    generated = r2.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert clean_sim.stats()["request_ids"][-1] == generated


def test_hop_by_hop_request_headers_are_not_forwarded(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    httpx.post(
        gateway.url + "/v1/chat/completions",
        json=CHAT,
        headers={
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "X-End-To-End": "yes",
        },
        timeout=30,
    )
    seen = dict(clean_sim.stats()["last_request"]["headers"])
    assert "x-secret-hop" not in seen
    assert seen["x-end-to-end"] == "yes"
    assert "authorization" not in seen


def test_upstream_errors_pass_through_unchanged(gateway: ServerProcess, clean_sim: Sim) -> None:
    bad = dict(CHAT, model="no-such-model")
    direct = httpx.post(clean_sim.base_url + "/chat/completions", json=bad, timeout=10)
    via = httpx.post(gateway.url + "/v1/chat/completions", json=bad, timeout=10)
    assert via.status_code == direct.status_code == 404
    assert via.content == direct.content
    malformed = b'{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}'
    via = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=malformed,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert via.status_code == 400
    assert via.json()["error"]["code"] == 400


def test_openai_sdk_sync_and_async(gateway: ServerProcess, clean_sim: Sim) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 12
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**CHAT, stream=True)
        if c.choices
    ]
    assert "".join(parts) == reply.choices[0].message.content
    assert [m.id for m in client.models.list()] == [MODEL, "tiny-llama"]

    async def run_async() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        one = await aclient.chat.completions.create(**CHAT)
        stream = await aclient.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        text, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 12
        await aclient.close()
        return one.choices[0].message.content or "", "".join(text)

    one, streamed = asyncio.run(run_async())
    assert one == streamed == reply.choices[0].message.content


def test_query_string_and_other_methods_are_relayed(gateway: ServerProcess, clean_sim: Sim) -> None:
    r = httpx.get(gateway.url + "/v1/models?limit=5", timeout=10)
    assert r.status_code == 200
    last = clean_sim.stats()["last_request"]
    assert last["path"].endswith("/v1/models")
    before = clean_sim.receipts(None)
    r = httpx.get(gateway.url + "/v1/nope", timeout=10)
    assert r.status_code == 404  # not on the allow-list: the gateway's answer, never forwarded
    assert r.json()["error"]["code"] == "not_found"
    assert clean_sim.receipts(None) == before
    r = httpx.get(gateway.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405


def test_unknown_gateway_path_is_a_json_404(gateway: ServerProcess) -> None:
    r = httpx.get(gateway.url + "/nothing-here", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_dot_segments_are_refused(gateway: ServerProcess, clean_sim: Sim) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(b"GET /v1/../health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    assert clean_sim.receipts(None) == 0


def test_body_over_the_limit_gets_413_and_is_not_forwarded(sim: Sim) -> None:
    env = {"VLLM_WRAPPER_MAX_BODY_BYTES": "1000"}
    with gateway_server(sim.base_url, env=env) as gw:
        sim.reset()
        big = dict(CHAT, messages=[{"role": "user", "content": "x" * 2000}])
        r = httpx.post(gw.url + "/v1/chat/completions", json=big, timeout=10)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"

        def chunked():
            yield b'{"model":"m","messages":[{"role":"user","content":"'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}]}'

        r = httpx.post(gw.url + "/v1/chat/completions", content=chunked(), timeout=10)
        assert r.status_code == 413
        assert sim.receipts(None) == 0
        ok = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert ok.status_code == 200


def test_tokenize_reaches_the_upstreams_root(gateway, clean_sim) -> None:
    """vLLM serves /tokenize beside /v1, not under it: both gateway paths get there."""
    import httpx

    body = {"model": "tiny-llama", "prompt": "Hello world"}
    direct = httpx.post(clean_sim.url + "/tokenize", json=body, timeout=10)
    assert direct.status_code == 200
    for path in ("/tokenize", "/v1/tokenize"):
        r = httpx.post(gateway.url + path, json=body, timeout=10)
        assert r.status_code == 200, (path, r.text)
        assert r.json() == direct.json()
    assert httpx.get(gateway.url + "/tokenize", timeout=10).status_code == 405
