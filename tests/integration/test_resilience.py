"""Retries, Retry-After, never retrying a started stream, disconnects, upstream down."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, Sim
from tests.support.servers import ServerProcess, gateway_server
from tests.support.streams import check_disconnect_aborts


@pytest.mark.parametrize("status", [502, 503, 504])
@pytest.mark.parametrize("failures", [1, 3])
def test_retries_recover_within_max(
    gateway: ServerProcess, clean_sim: Sim, status: int, failures: int
) -> None:
    clean_sim.faults(fail_next=failures, status=status)
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
    assert r.status_code == 200, r.text
    assert clean_sim.receipts() == failures + 1


def test_retries_exhausted_give_503_with_cause(gateway: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(fail_next=10, status=503)
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
    assert r.status_code == 503
    error = r.json()["error"]
    assert "503" in error["message"] and "4 attempts" in error["message"]
    assert error["type"] == "upstream_error"
    assert clean_sim.receipts() == 4  # 1 + VLLM_MAX_RETRIES
    clean_sim.reset()
    assert (
        httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30).status_code
        == 200
    )


def test_upstream_504s_exhausted_give_504(gateway: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(fail_next=10, status=504)
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"


def test_non_retryable_statuses_pass_straight_through(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(fail_next=1, status=500)
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
    assert r.status_code == 500
    assert clean_sim.receipts() == 1
    clean_sim.reset()
    clean_sim.faults(fail_next=1, status=429)  # no Retry-After: the client decides
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
    assert r.status_code == 429
    assert clean_sim.receipts() == 1


def test_retry_after_is_honoured(gateway: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(fail_next=1, status=429, retry_after=1)
    start = time.monotonic()
    r = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
    waited = time.monotonic() - start
    assert r.status_code == 200
    assert clean_sim.receipts() == 2
    # Backoff alone is at most 0.05 s in these tests; only Retry-After explains a 1 s wait.
    assert waited >= 0.95


def test_retry_after_above_the_cap_is_capped(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_RETRY_AFTER_MAX": "0.2"}
    with gateway_server(sim.base_url, env=env) as gw:
        sim.reset()
        sim.faults(fail_next=1, status=503, retry_after=3600)
        r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=20)
        assert r.status_code == 200
        assert sim.receipts() == 2


def test_started_stream_is_never_retried(gateway: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(drop_after_chunks=3)
    body = dict(CHAT_BODY, stream=True, max_tokens=30)
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    received += chunk
    assert received.count(b"data: ") >= 1
    assert b"[DONE]" not in received
    assert clean_sim.receipts() == 1
    assert (
        httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30).status_code
        == 200
    )


def test_client_disconnect_aborts_the_upstream_stream(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    check_disconnect_aborts(gateway.url + "/v1/chat/completions", clean_sim, CHAT_BODY)


def test_client_disconnect_aborts_a_non_streaming_generation(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    body = dict(CHAT_BODY, max_tokens=200)
    headers = {"x-sim-token-delay": "0.05"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=0.5)
    stats = clean_sim.wait_aborted(1, timeout=5)
    assert stats["aborted"] == 1


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    stop.set()
    t.join(2)
    for s in accepted:
        s.close()
    server.close()


def test_upstream_down_health_is_fast_and_v1_gives_503(dead_upstream: str) -> None:
    with gateway_server(dead_upstream, env={**GATEWAY_ENV, "VLLM_TIMEOUT": "60"}) as gw:
        r = httpx.get(gw.url + "/health", timeout=10)
        assert r.status_code == 200
        assert r.json()["vllm_available"] is False
        assert r.json()["status"] == "unhealthy"
        assert httpx.get(gw.url + "/health?strict=1", timeout=10).status_code == 503
        r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_unavailable"
        assert "4 attempts" in r.json()["error"]["message"]


def test_health_uses_its_short_timeout_not_vllm_timeout(blackhole: str) -> None:
    env = {**GATEWAY_ENV, "VLLM_TIMEOUT": "60", "VLLM_WRAPPER_HEALTH_TIMEOUT": "0.5"}
    with gateway_server(blackhole, env=env) as gw:
        # With VLLM_TIMEOUT (60 s) this would hit the client's 10 s timeout.
        r = httpx.get(gw.url + "/health", timeout=10)
        assert r.json()["vllm_available"] is False


def test_read_timeout_is_504_and_not_retried(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_TIMEOUT": "0.5"}
    with gateway_server(sim.base_url, env=env) as gw:
        sim.reset()
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json=CHAT_BODY,
            headers={"x-sim-first-byte-delay": "3"},
            timeout=20,
        )
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        assert sim.receipts() == 1


def test_timeout_is_idle_time_not_a_cap_on_a_long_stream(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_TIMEOUT": "0.5"}
    with gateway_server(sim.base_url, env=env) as gw:
        body = dict(CHAT_BODY, stream=True, max_tokens=15)
        # 15 tokens x 0.1 s = 1.5 s in all, three times VLLM_TIMEOUT, but never idle 0.5 s.
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            json=body,
            headers={"x-sim-token-delay": "0.1"},
            timeout=20,
        ) as r:
            data = b"".join(r.iter_raw())
        assert data.endswith(b"data: [DONE]\n\n")
