"""Hostile clients and broken upstreams on raw sockets against real processes (issue 12).

The gateway runs as ``python -m proxy`` (uvicorn + the bounded httptools protocol), auth
on, with short head timeouts so the time-outs show within the test's deadlines.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import GATEWAY_ENV, KEY, Sim
from tests.support.procfs import open_fds, rss_bytes
from tests.support.rawclient import (
    connect,
    exchange,
    flood,
    read_response,
    read_until_close,
    status_of,
)
from tests.support.rawupstream import RawUpstream
from tests.support.servers import ServerProcess, gateway_server

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 1.0
AUTH = b"authorization: Bearer " + KEY.encode() + b"\r\n"

HARD_ENV = {
    **GATEWAY_ENV,
    "VLLM_WRAPPER_API_KEY": KEY,
    "VLLM_WRAPPER_MAX_HEADER_BYTES": str(HEAD_LIMIT),
    "VLLM_WRAPPER_HEADER_TIMEOUT": str(HEAD_TIMEOUT),
    "VLLM_WRAPPER_SEND_TIMEOUT": "1",
}


@pytest.fixture(scope="module")
def hard(sim: Sim) -> Iterator[ServerProcess]:
    with gateway_server(sim.base_url, env=HARD_ENV) as server:
        yield server


def _pid(server: ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


def _healthy(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# -- 1. the request head is bounded in size and time ------------------------------------


def test_endless_header_lines_are_refused_431_while_they_arrive(hard: ServerProcess) -> None:
    rss_before = rss_bytes(_pid(hard))
    with connect(hard.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        sent = flood(sock, b"x-fill: " + b"a" * 1000 + b"\r\n", max_bytes=64 << 20)
        answer = read_until_close(sock)
    assert status_of(answer) == 431, answer[:300]
    assert b"request_headers_too_large" in answer
    assert sent < 32 << 20  # the server stopped it long before the flood was out
    assert rss_bytes(_pid(hard)) - rss_before < 32 << 20
    _healthy(hard)


def test_one_huge_header_value_is_refused_431(hard: ServerProcess) -> None:
    with connect(hard.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: ")
        flood(sock, b"b" * 65536, max_bytes=64 << 20)
        answer = read_until_close(sock)
    assert status_of(answer) == 431, answer[:300]
    _healthy(hard)


def test_long_request_target_is_refused(hard: ServerProcess) -> None:
    with connect(hard.port) as sock:
        sock.sendall(b"GET /health?" + b"p" * (HEAD_LIMIT * 2) + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = read_until_close(sock)
    assert status_of(answer) == 414, answer[:300]
    assert b"uri_too_long" in answer


def test_head_just_under_the_limit_is_served(hard: ServerProcess) -> None:
    filler = b"x-fill: " + b"a" * (HEAD_LIMIT // 2) + b"\r\n"
    answer = exchange(
        hard.port, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + filler + b"\r\n"
    )
    assert status_of(answer) == 200, answer[:300]


def test_slow_head_gets_408_after_the_head_timeout(hard: ServerProcess) -> None:
    with connect(hard.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        start = time.monotonic()
        answer = b""
        # one byte a fifth of a second, far longer than the head timeout
        for _ in range(200):
            try:
                sock.sendall(b"x")
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - start > 30:
                break
            sock.setblocking(False)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if answer:
                break
        answer += read_until_close(sock, timeout=5)
    assert status_of(answer) == 408, answer[:300]
    assert b"request_timeout" in answer


def test_idle_connections_are_closed_after_the_head_timeout(hard: ServerProcess) -> None:
    socks = [connect(hard.port) for _ in range(50)]
    try:
        for sock in socks:
            # nothing sent: the server closes without an answer
            assert read_until_close(sock, timeout=15) == b""
    finally:
        for sock in socks:
            sock.close()
    _healthy(hard)


def test_fds_come_back_after_head_attacks(hard: ServerProcess) -> None:
    pid = _pid(hard)
    _healthy(hard)
    fds_before = open_fds(pid)
    socks = [connect(hard.port) for _ in range(30)]
    for i, sock in enumerate(socks):
        sock.sendall(b"GET /health HTTP/1.1\r\n" if i % 2 else b"")
    for sock in socks:
        read_until_close(sock, timeout=15)
        sock.close()
    deadline = time.monotonic() + 15
    while open_fds(pid) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(pid) <= fds_before + 2


def test_keep_alive_requests_still_work(hard: ServerProcess) -> None:
    with connect(hard.port) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            head, body = read_response(sock)
            assert status_of(head) == 200
            assert b"healthy" in body


# -- a scripted upstream on raw sockets ---------------------------------------------------


def _answer(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


@pytest.fixture(scope="module")
def scripted() -> Iterator[RawUpstream]:
    with RawUpstream("script", script=lambda conn, req, n: False) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def front(scripted: RawUpstream) -> Iterator[ServerProcess]:
    """The gateway (auth on, every path relayed) in front of the scripted upstream."""
    env = {
        **HARD_ENV,
        "VLLM_API_KEY": "upstream-secret",
        "VLLM_WRAPPER_PROXY_ALL": "true",
        "VLLM_MAX_RETRIES": "0",
    }
    with gateway_server(scripted.base_url, env=env) as server:
        yield server


def _echo(conn: socket.socket, request: bytes, n: int) -> bool:
    """Answers every request with its own head, as JSON text (an echoing upstream)."""
    conn.sendall(_answer(json.dumps({"echo": request.decode("latin-1")}).encode()))
    return True


# -- 11. a client that stops reading does not hold its generation ---------------------------


def test_a_client_that_stops_reading_is_disconnected_and_the_upstream_closed(
    front: ServerProcess, scripted: RawUpstream
) -> None:
    closed = threading.Event()

    def endless_stream(conn: socket.socket, request: bytes, n: int) -> bool:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        event = b'data: {"choices":[{"text":"' + b"t" * 60000 + b'"}]}\n\n'
        frame = b"%x\r\n%s\r\n" % (len(event), event)
        conn.settimeout(60)
        try:
            for _ in range(100_000):  # far more than any socket buffers hold
                conn.sendall(frame)
        except OSError:
            closed.set()  # the gateway closed the upstream request
        return False

    scripted.script = endless_stream
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", front.port))
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
            + AUTH
            + b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        )
        assert sock.recv(1)  # the stream started; now read nothing more
        assert closed.wait(30), "the upstream stream was still open after 30 s"
    finally:
        sock.close()
    _healthy(front)


# -- 2. no request without a valid key reaches an upstream --------------------------------


@pytest.mark.parametrize("origin", [b"", b"origin: http://evil.example\r\n"])
def test_keyless_options_is_refused_and_never_relayed(
    front: ServerProcess, scripted: RawUpstream, origin: bytes
) -> None:
    scripted.script = _echo
    before = scripted.receipts
    answer = exchange(
        front.port,
        b"OPTIONS /v1/models HTTP/1.1\r\nhost: x\r\naccess-control-request-method: POST\r\n"
        + origin
        + b"content-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    assert status_of(answer) == 401, answer[:300]
    assert b"upstream-secret" not in answer
    assert scripted.receipts == before


def test_preflight_with_cors_on_is_answered_by_the_gateway(sim: Sim) -> None:
    with RawUpstream("script", script=_echo) as upstream:
        env = {**HARD_ENV, "VLLM_WRAPPER_CORS_ORIGINS": "http://app.example"}
        with gateway_server(upstream.base_url, env=env) as gw:
            before = upstream.receipts  # the start-up health probe
            answer = exchange(
                gw.port,
                b"OPTIONS /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                b"origin: http://app.example\r\naccess-control-request-method: POST\r\n"
                b"connection: close\r\n\r\n",
            )
            keyless = exchange(
                gw.port,
                b"OPTIONS /v1/models HTTP/1.1\r\nhost: x\r\n"
                b"access-control-request-method: POST\r\nconnection: close\r\n\r\n",
            )
        assert status_of(answer) == 200, answer[:300]
        assert b"access-control-allow-origin: http://app.example" in answer.lower()
        assert status_of(keyless) == 401, keyless[:300]
        assert upstream.receipts == before


# -- 3. a pooled connection with unexpected bytes is never reused -------------------------


def test_a_late_second_response_never_reaches_the_next_client(
    front: ServerProcess, scripted: RawUpstream
) -> None:
    def poison(conn: socket.socket, request: bytes, n: int) -> bool:
        if b"x-first: yes" in request:
            conn.sendall(_answer(b'{"first":true}'))
            time.sleep(0.3)  # the gateway has released the connection to its pool
            conn.sendall(_answer(b'{"poison":"yes!"}'))
            return True
        conn.sendall(_answer(b'{"honest":true}'))
        return True

    scripted.script = poison
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=10) as client:
        first = client.get(front.url + "/v1/models", headers={**headers, "x-first": "yes"})
        assert first.json() == {"first": True}
        time.sleep(0.8)  # the poison has arrived on the idle pooled connection
        for _ in range(5):
            nxt = client.post(front.url + "/v1/completions", headers=headers, json={})
            assert nxt.json() == {"honest": True}, nxt.text


# -- 4. trailers are never headers -----------------------------------------------------------


def _chunked_post(path: bytes, trailers: bytes, auth: bytes = b"") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"content-type: application/json\r\nconnection: close\r\n"
        + auth
        + b"\r\n2\r\n{}\r\n0\r\n"
        + trailers
        + b"\r\n"
    )


def test_a_key_sent_as_a_trailer_does_not_authenticate(
    front: ServerProcess, scripted: RawUpstream
) -> None:
    scripted.script = _echo
    before = scripted.receipts
    answer = exchange(front.port, _chunked_post(b"/v1/completions", AUTH))
    assert status_of(answer) == 401, answer[:300]
    assert scripted.receipts == before


def test_trailers_are_not_forwarded(front: ServerProcess, scripted: RawUpstream) -> None:
    scripted.script = _echo
    answer = exchange(front.port, _chunked_post(b"/v1/completions", b"x-trailer: sneaky\r\n", AUTH))
    assert status_of(answer) == 200, answer[:300]
    assert b"sneaky" not in answer
    assert b"x-trailer" not in answer.lower()


def test_a_trailer_flood_closes_the_connection(front: ServerProcess, scripted: RawUpstream) -> None:
    scripted.script = _echo
    rss_before = rss_bytes(_pid(front))
    with connect(front.port) as sock:
        sock.sendall(_chunked_post(b"/v1/completions", b"", AUTH)[:-2])  # trailers still open
        sent = flood(sock, b"x-t: " + b"t" * 1000 + b"\r\n", max_bytes=64 << 20)
        answer = read_until_close(sock)
    assert sent < 32 << 20
    assert b"x-t: ttt" not in answer
    assert rss_bytes(_pid(front)) - rss_before < 32 << 20
    _healthy(front)


# -- 5, 8. /chat reads upstream answers bounded, and any unreadable one is a 502 ---------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BEARER = {"authorization": f"Bearer {KEY}"}


def _sse(conn: socket.socket, *events: bytes) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    for event in events:
        conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
    conn.sendall(b"0\r\n\r\n")


def _chat(front: ServerProcess, stream: bool) -> httpx.Response:
    return httpx.post(
        front.url + "/chat", json={**CHAT, "stream": stream}, headers=BEARER, timeout=30
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":"many"}}',
        b'{"choices":[{"message":{"content":["x"]}}]}',
        b'{"choices":[{"message":{"content":"x"}}],"model":{"a":1}}',
        b'{"choices":{"0":{"message":{"content":"x"}}}}',
        b'{"choices":["x"]}',
        b"[1,2]",
    ],
)
def test_wrongly_typed_answers_are_502(
    front: ServerProcess, scripted: RawUpstream, body: bytes
) -> None:
    scripted.script = lambda conn, req, n: conn.sendall(_answer(body)) or True
    r = _chat(front, stream=False)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_protocol_error"


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"choices":[{"index":0,"delta":{"content":42}}]}\n\n',
        b'data: {"choices":["nope"]}\n\n',
        b'data: {"choices":{"index":0}}\n\n',
        b'data: {"choices":[{"index":0,"delta":"x"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":[1]}}\n\n',
    ],
)
def test_wrongly_typed_stream_events_end_in_event_error(
    front: ServerProcess, scripted: RawUpstream, event: bytes
) -> None:
    good = b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
    scripted.script = lambda conn, req, n: _sse(conn, good, event, b"data: [DONE]\n\n") or False
    r = _chat(front, stream=True)
    assert r.status_code == 200
    assert b"data: ok" in r.content
    assert b"event: error" in r.content and b"upstream_protocol_error" in r.content, r.content
    assert b"[DONE]" not in r.content


def test_an_endless_sse_line_ends_in_event_error_with_memory_flat(
    front: ServerProcess, scripted: RawUpstream
) -> None:
    def endless(conn: socket.socket, request: bytes, n: int) -> bool:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 65536
        frame = b"%x\r\n%s\r\n" % (len(piece) + 6, b"data: " + piece)
        try:
            for _ in range(1024):  # up to 64 MiB, never a line end
                conn.sendall(frame)
        except OSError:
            pass
        return False

    scripted.script = endless
    rss_before = rss_bytes(_pid(front))
    r = _chat(front, stream=True)
    assert b"event: error" in r.content and b"upstream_protocol_error" in r.content
    assert rss_bytes(_pid(front)) - rss_before < 48 << 20


def test_an_oversized_whole_answer_is_502(front: ServerProcess, scripted: RawUpstream) -> None:
    big = b'{"choices":[{"message":{"content":"' + b"y" * (20 << 20) + b'"}}]}'
    scripted.script = lambda conn, req, n: conn.sendall(_answer(big)) or False
    r = _chat(front, stream=False)
    assert r.status_code == 502, r.text[:300]
    assert r.json()["error"]["code"] == "upstream_protocol_error"


# -- 7. /chat refuses deep nesting with 400 ------------------------------------------------


@pytest.mark.parametrize("depth", [200, 300, 1024])
def test_deeply_nested_chat_is_400(front: ServerProcess, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = '{"messages":[{"role":"user","content":"hi"}],"extra":' + nested + "}"
    r = httpx.post(
        front.url + "/chat",
        content=body,
        headers={**BEARER, "content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "body"


# -- 9. broken upstream heads are a 502 -----------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nx-bad: a\x01b\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 099 Odd\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ],
)
def test_broken_upstream_heads_are_502(
    front: ServerProcess, scripted: RawUpstream, head: bytes
) -> None:
    scripted.script = lambda conn, req, n: conn.sendall(head) or False
    for path in ("/v1/models", "/chat"):
        method = "GET" if path == "/v1/models" else "POST"
        r = httpx.request(method, front.url + path, json=CHAT, headers=BEARER, timeout=10)
        assert r.status_code == 502, (path, r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "upstream_protocol_error"


# -- 10. an h2c upgrade never drops a body ----------------------------------------------------


def test_h2c_upgrade_with_a_body_is_refused_not_relayed(
    front: ServerProcess, scripted: RawUpstream
) -> None:
    scripted.script = _echo
    before = scripted.receipts
    answer = exchange(
        front.port,
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
        + AUTH
        + b"connection: upgrade, http2-settings\r\n"
        b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\ncontent-type: application/json\r\n"
        b'content-length: 13\r\n\r\n{"prompt":""}',
    )
    assert status_of(answer) == 400, answer[:300]
    assert b"unsupported_upgrade" in answer
    assert scripted.receipts == before


def test_h2c_upgrade_without_a_body_is_served(front: ServerProcess, scripted: RawUpstream) -> None:
    scripted.script = _echo
    answer = exchange(
        front.port,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n"
        + AUTH
        + b"connection: upgrade, http2-settings\r\n"
        b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n",
        timeout=10,
    )
    assert status_of(answer) == 200, answer[:300]


# -- 6. one request, one log line ------------------------------------------------------------


def test_control_characters_in_the_path_stay_on_one_log_line(
    front: ServerProcess, scripted: RawUpstream
) -> None:
    scripted.script = _echo
    marker = f"forged{time.monotonic_ns()}"
    target = f"/v1/models%0A{marker}%200%20upstream=1ms%0D%1B[31m%00%E2%80%A8end"
    exchange(
        front.port,
        f"GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n".encode() + AUTH + b"\r\n",
    )
    deadline = time.monotonic() + 10
    while marker not in front.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in front.log_text().splitlines() if marker in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "proxy.access" in line and "\\x0A" + marker in line, line
    for raw in ("\r", "\x1b", "\x00", "\u2028"):
        assert raw not in line
    assert "\\x0D\\x1B[31m\\x00\\xE2\\x80\\xA8end" in line


def test_the_limits_hold_in_every_worker_process(sim: Sim) -> None:
    with gateway_server(sim.base_url, "--workers", "2", env=HARD_ENV) as gw:
        for _ in range(4):  # the kernel spreads connections over both workers
            with connect(gw.port) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
                flood(sock, b"x-fill: " + b"a" * 1000 + b"\r\n", max_bytes=8 << 20)
                assert status_of(read_until_close(sock)) == 431
