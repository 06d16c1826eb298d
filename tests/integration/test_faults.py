"""Fault suite: upstream and client misbehaviour on /v1, and the gateway still serving after.

Every case checks what the client sees, how many times the request reached the
upstream (never more than ``1 + VLLM_MAX_RETRIES``, never twice once a stream
started), and that the gateway answers the next request.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, MODEL, Sim
from tests.support.procfs import connections_to, open_fds
from tests.support.rawupstream import RawUpstream, full_backlog_port
from tests.support.servers import ServerProcess, free_port, gateway_server, sim_server

FAULT_ENV = {
    **GATEWAY_ENV,
    "VLLM_TIMEOUT": "1",
    "VLLM_WRAPPER_BODY_TIMEOUT": "1",
    "VLLM_MAX_RETRIES": "2",
    "VLLM_WRAPPER_RETRY_AFTER_MAX": "0.1",
    "VLLM_WRAPPER_HEALTH_TIMEOUT": "0.3",
}
STREAM_BODY = dict(CHAT_BODY, stream=True, max_tokens=30)


@pytest.fixture(scope="module")
def fault_gateway(sim: Sim) -> Iterator[ServerProcess]:
    """Short timeouts and two retries, in front of the shared simulator."""
    with gateway_server(sim.base_url, env=FAULT_ENV) as server:
        yield server


def assert_serves(gw: ServerProcess) -> None:
    """The gateway answers a normal request after the fault."""
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
    assert r.status_code == 200, r.text


def read_stream(url: str, body: dict, headers: dict | None = None) -> tuple[int, bytes, str]:
    """Status, bytes received, and how the stream ended: ``clean`` or the error's name."""
    received = b""
    status = 0
    try:
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url, json=body, headers=headers or {}) as r:
                status = r.status_code
                for chunk in r.iter_raw():
                    received += chunk
    except httpx.HTTPError as exc:
        return status, received, type(exc).__name__
    return status, received, "clean"


# ---- upstream: timeouts ---------------------------------------------------------------


def test_connect_timeout_is_retried_then_504() -> None:
    with full_backlog_port() as upstream:
        env = {**FAULT_ENV, "VLLM_TIMEOUT": "0.3", "VLLM_MAX_RETRIES": "1"}
        with gateway_server(upstream, env=env) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
            assert r.status_code == 504
            error = r.json()["error"]
            assert error["code"] == "upstream_timeout"
            assert "connect" in error["message"] and "2 attempts" in error["message"]
            assert httpx.get(gw.url + "/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    with RawUpstream("silent") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def raw_gateway(raw: RawUpstream) -> Iterator[ServerProcess]:
    with gateway_server(raw.base_url, env={**FAULT_ENV, "VLLM_TIMEOUT": "0.5"}) as gw:
        yield gw


def _raw_mode(raw: RawUpstream, mode: str, chunks: int = 2) -> RawUpstream:
    raw.mode, raw.chunks, raw.receipts = mode, chunks, 0
    return raw


def test_upstream_that_accepts_and_never_answers_is_a_504_not_retried(
    raw: RawUpstream, raw_gateway: ServerProcess
) -> None:
    _raw_mode(raw, "silent")
    r = httpx.post(raw_gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert "read timeout" in r.json()["error"]["message"]
    assert raw.receipts == 1  # it has the request: a retry could run the generation twice
    assert httpx.get(raw_gateway.url + "/health", timeout=10).status_code == 200


def test_stall_mid_stream_cuts_the_v1_stream_once_idle_for_vllm_timeout(
    fault_gateway: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(stall_after_chunks=3, stall_seconds=20)
    start = time.monotonic()
    status, received, end = read_stream(fault_gateway.url + "/v1/chat/completions", STREAM_BODY)
    assert status == 200
    assert end == "RemoteProtocolError"  # cut, not a clean (short) end
    assert time.monotonic() - start >= 0.9  # VLLM_TIMEOUT is 1 s of idleness
    assert received.count(b"data: ") == 3 and b"[DONE]" not in received
    assert clean_sim.wait_aborted(1, timeout=10)["aborted"] == 1  # upstream closed, GPU freed
    assert clean_sim.receipts() == 1
    assert_serves(fault_gateway)


# ---- upstream: connection resets --------------------------------------------------------


def test_reset_before_the_response_is_retried_at_most_max_retries(
    raw: RawUpstream, raw_gateway: ServerProcess
) -> None:
    _raw_mode(raw, "reset")
    r = httpx.post(raw_gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert raw.receipts == 3  # 1 + VLLM_MAX_RETRIES
    assert httpx.get(raw_gateway.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("chunks", [0, 2])
def test_reset_after_k_chunks_cuts_the_stream_and_is_never_resent(
    raw: RawUpstream, raw_gateway: ServerProcess, chunks: int
) -> None:
    _raw_mode(raw, "reset_after", chunks)
    status, received, end = read_stream(raw_gateway.url + "/v1/chat/completions", STREAM_BODY)
    assert status == 200
    assert end in ("RemoteProtocolError", "ReadError")
    assert received.count(b"data: ") == chunks
    assert raw.receipts == 1  # the response started: never sent again
    assert httpx.get(raw_gateway.url + "/health", timeout=10).status_code == 200


# ---- upstream: error statuses ---------------------------------------------------------------

# (upstream status, its Retry-After) -> (client status, upstream receipts) with VLLM_MAX_RETRIES=2
STATUS_CASES = [
    (500, None, 500, 1),
    (500, "1", 500, 1),
    (502, None, 503, 3),
    (502, "1", 503, 3),
    (503, None, 503, 3),
    (503, "1", 503, 3),
    (504, None, 504, 3),
    (504, "1", 504, 3),
    (429, None, 429, 1),
    (429, "1", 503, 3),
]


@pytest.mark.parametrize(("status", "retry_after", "expected", "receipts"), STATUS_CASES)
def test_upstream_error_statuses(
    fault_gateway: ServerProcess,
    clean_sim: Sim,
    status: int,
    retry_after: str | None,
    expected: int,
    receipts: int,
) -> None:
    clean_sim.faults(fail_next=10, status=status, retry_after=retry_after)
    r = httpx.post(fault_gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
    assert r.status_code == expected
    assert clean_sim.receipts() == receipts
    assert r.json()["error"]["message"]
    if receipts > 1:  # the gateway's own answer, naming the cause
        assert f"answered {status} to all 3 attempts" in r.json()["error"]["message"]
    assert r.headers.get("retry-after") == retry_after
    clean_sim.reset()
    assert_serves(fault_gateway)


def test_non_json_error_bodies(fault_gateway: ServerProcess, clean_sim: Sim) -> None:
    page = "<html><body>502 Bad Gateway (nginx)</body></html>"
    clean_sim.faults(fail_next=1, status=500, body=page)
    r = httpx.post(fault_gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
    assert (r.status_code, r.text) == (500, page)  # not retried: relayed as is
    clean_sim.faults(fail_next=10, status=502, body=page)
    r = httpx.post(fault_gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_unavailable"
    clean_sim.reset()
    assert_serves(fault_gateway)


def test_garbage_instead_of_sse_is_relayed_byte_for_byte(
    fault_gateway: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(garbage=True)
    direct_garbage = b"<html>\x00\xff\xfe this is not an event stream"
    status, received, end = read_stream(fault_gateway.url + "/v1/chat/completions", STREAM_BODY)
    assert (status, end) == (200, "clean")
    assert received.startswith(direct_garbage)  # /v1 is transparent: the client's parser decides
    assert_serves(fault_gateway)


# ---- upstream: restarts and cold starts ------------------------------------------------------


def test_upstream_restart_with_streams_in_flight() -> None:
    port = free_port()
    with sim_server("--model", MODEL, port=port) as upstream:
        with gateway_server(upstream.url + "/v1", env=FAULT_ENV) as gw:
            n = 6
            started = threading.Barrier(n + 1, timeout=20)
            ends: list[tuple[int, bytes, str]] = []

            def one() -> None:
                received = b""
                try:
                    with httpx.Client(timeout=30) as client:
                        with client.stream(
                            "POST",
                            gw.url + "/v1/chat/completions",
                            json=dict(STREAM_BODY, max_tokens=500),
                            headers={"x-sim-token-delay": "0.05"},
                        ) as r:
                            it = r.iter_raw()
                            received += next(it)
                            started.wait()
                            for chunk in it:
                                received += chunk
                    ends.append((r.status_code, received, "clean"))
                except httpx.HTTPError as exc:
                    ends.append((200, received, type(exc).__name__))

            threads = [threading.Thread(target=one) for _ in range(n)]
            for t in threads:
                t.start()
            started.wait()
            assert upstream.proc is not None
            upstream.proc.send_signal(signal.SIGKILL)  # a crash, not a graceful stop
            upstream.proc.wait(10)
            for t in threads:
                t.join(30)
            assert len(ends) == n
            for _status, received, end in ends:
                assert end != "clean" and b"[DONE]" not in received
            # Down: a clear 503; then back on the same port: served again.
            r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
            assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
            upstream.start()
            assert_serves(gw)
            assert connections_to(gw.proc.pid, port) <= 1  # only the pooled one just used


def test_cold_start_request_waits_through_retries_and_succeeds() -> None:
    port = free_port()
    env = {
        **FAULT_ENV,
        "VLLM_MAX_RETRIES": "20",
        "VLLM_WRAPPER_RETRY_BACKOFF": "0.5",
        "VLLM_WRAPPER_RETRY_BACKOFF_MAX": "0.5",
    }
    with gateway_server(f"http://127.0.0.1:{port}/v1", env=env) as gw:
        result: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: result.append(
                httpx.post(gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=60)
            )
        )
        t.start()
        deadline = time.monotonic() + 10
        while "upstream attempt 1 failed" not in gw.log_text():
            assert time.monotonic() < deadline, gw.log_text()
            time.sleep(0.05)
        with sim_server("--model", MODEL, port=port) as upstream:
            t.join(60)
            assert result and result[0].status_code == 200, result
            assert httpx.get(upstream.url + "/_sim/stats").json()["requests"] == 1
            assert httpx.get(gw.url + "/health", timeout=10).json()["vllm_available"] is True


# ---- client faults -------------------------------------------------------------------------


def _raw_send(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    return s


def _chat_head(port_headers: bytes, length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + port_headers
        + b"content-length: %d\r\n\r\n" % length
    )


def test_client_disconnect_before_the_first_byte_aborts_upstream(
    fault_gateway: ServerProcess, clean_sim: Sim
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            fault_gateway.url + "/v1/chat/completions",
            json=STREAM_BODY,
            # Token pauses let the simulator notice the disconnect and count an abort.
            headers={"x-sim-first-byte-delay": "0.8", "x-sim-token-delay": "0.05"},
            timeout=0.3,
        )
    stats = clean_sim.wait_aborted(1, timeout=10)
    assert (stats["aborted"], stats["completed"], stats["open_streams"]) == (1, 0, 0)
    assert_serves(fault_gateway)


def test_client_disconnect_while_sending_the_body_forwards_nothing(
    fault_gateway: ServerProcess, clean_sim: Sim
) -> None:
    s = _raw_send(fault_gateway.port, _chat_head(b"", 100_000) + b'{"model": "x", "mess')
    time.sleep(0.2)
    s.close()
    time.sleep(0.2)
    assert clean_sim.receipts() == 0
    assert_serves(fault_gateway)
    assert "client-disconnected" in fault_gateway.log_text()


def test_slow_body_is_cut_by_the_body_timeout(fault_gateway: ServerProcess, clean_sim: Sim) -> None:
    body = b'{"model": "m", "messages": []}'
    s = _raw_send(fault_gateway.port, _chat_head(b"", len(body)))
    start = time.monotonic()
    data = b""
    with s:
        s.settimeout(0.15)
        for byte in body:  # one byte every 0.15 s: 4.5 s in all, the limit is 1 s
            try:
                s.sendall(bytes([byte]))
                data += s.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        s.settimeout(5)
        while b'"}}' not in data and (chunk := s.recv(65536)):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b'"request_timeout"' in data
    assert time.monotonic() - start >= 0.9
    assert clean_sim.receipts() == 0
    assert_serves(fault_gateway)


def test_many_disconnects_leave_no_upstream_streams_or_connections(
    fault_gateway: ServerProcess, clean_sim: Sim
) -> None:
    assert fault_gateway.proc is not None
    pid, sim_port = fault_gateway.proc.pid, int(clean_sim.url.rsplit(":", 1)[1])
    assert_serves(fault_gateway)
    fds_before, conns_before = open_fds(pid), connections_to(pid, sim_port)
    n = 40

    def disconnect_after_first_chunk() -> None:
        with httpx.Client(timeout=30) as client:
            with client.stream(
                "POST",
                fault_gateway.url + "/v1/chat/completions",
                json=dict(STREAM_BODY, max_tokens=500),
                headers={"x-sim-token-delay": "0.02"},
            ) as r:
                next(r.iter_raw())

    for _round in range(n // 10):
        threads = [threading.Thread(target=disconnect_after_first_chunk) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    stats = clean_sim.wait_aborted(n, timeout=20)
    assert (stats["aborted"], stats["open_streams"]) == (n, 0)
    deadline = time.monotonic() + 5
    while connections_to(pid, sim_port) > conns_before and time.monotonic() < deadline:
        time.sleep(0.05)
    # Aborted upstream connections are closed, not pooled: at most the idle one from before.
    assert connections_to(pid, sim_port) <= conns_before
    assert open_fds(pid) <= fds_before
    assert_serves(fault_gateway)
