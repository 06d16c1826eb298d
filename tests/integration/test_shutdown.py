"""Graceful shutdown: SIGTERM lets in-flight streams finish within the grace period."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import orjson
import pytest

import proxy
from proxy.config import Settings
from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, Sim
from tests.support.servers import ServerProcess, gateway_server

URL = "/v1/chat/completions"
# uvicorn re-raises the signal once it has shut down, so the exit status says "SIGTERM".
CLEAN_EXIT = (0, -signal.SIGTERM)


def _wait_for_log(server: ServerProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in log:\n{server.log_text()}"
        time.sleep(0.02)


def _refused(server: ServerProcess) -> bool:
    try:
        httpx.get(server.url + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_stream_in_flight_completes_across_sigterm(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_GRACEFUL_TIMEOUT": "30"}
    with gateway_server(sim.base_url, env=env) as gw:
        sim.reset()
        body = dict(CHAT_BODY, stream=True, max_tokens=30)
        headers = {"x-sim-token-delay": "0.05"}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", gw.url + URL, json=body, headers=headers) as r:
                chunks = r.iter_raw()
                first = next(chunks)
                gw.send_signal(signal.SIGTERM)
                _wait_for_log(gw, "Shutting down")
                assert sim.stats()["open_streams"] == 1  # still generating
                assert _refused(gw)  # no new connections once shutting down
                rest = b"".join(chunks)
        assert first.startswith(b"data: ")
        assert rest.endswith(b"data: [DONE]\n\n")
        assert gw.proc is not None and gw.proc.wait(10) in CLEAN_EXIT
        stats = sim.stats()
        assert stats["completed"] == 1 and stats["aborted"] == 0
        log = gw.log_text()
        assert "Application shutdown complete" in log
        assert "Traceback" not in log


def test_stream_longer_than_the_grace_period_is_cut_and_aborted(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_GRACEFUL_TIMEOUT": "0.5"}
    with gateway_server(sim.base_url, env=env) as gw:
        sim.reset()
        body = dict(CHAT_BODY, stream=True, max_tokens=400)
        headers = {"x-sim-token-delay": "0.05"}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", gw.url + URL, json=body, headers=headers) as r:
                chunks = r.iter_raw()
                received = next(chunks)
                gw.send_signal(signal.SIGTERM)
                with pytest.raises(httpx.RemoteProtocolError):
                    for chunk in chunks:
                        received += chunk
        assert b"[DONE]" not in received
        stats = sim.wait_aborted(1, timeout=10)
        assert stats["aborted"] == 1 and stats["open_streams"] == 0
        assert stats["generation_tokens"] < 400
        assert gw.proc is not None and gw.proc.wait(10) in CLEAN_EXIT
        log = gw.log_text()
        assert "timeout graceful shutdown exceeded" in log
        # one line for the cancelled request, not a CancelledError traceback
        assert "request cancelled: the shutdown grace period" in log
        assert "Traceback" not in log and "CancelledError" not in log
        # The cut request still finished before the pool closed: it has its log line.
        assert "POST /v1/chat/completions 200" in log


def test_lifespan_shutdown_waits_for_requests_in_flight(sim: Sim) -> None:
    """Leaving the lifespan (as a server or a host app does at shutdown) while a stream is
    being relayed lets it finish before the upstream pool closes."""
    sim.reset()
    body = orjson.dumps(dict(CHAT_BODY, stream=True, max_tokens=20))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-sim-token-delay", b"0.02")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def main() -> list[bytes]:
        gateway = proxy.create_app(Settings(base_url=sim.base_url, graceful_timeout=30))
        chunks: list[bytes] = []
        first_chunk = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                first_chunk.set()

        async with proxy.lifespan(gateway):
            request = asyncio.create_task(gateway(scope, receive, send))
            await first_chunk.wait()
            assert sim.stats()["open_streams"] == 1
        assert request.done()
        assert not gateway.state.upstream.is_open
        return chunks

    assert b"".join(asyncio.run(main())).endswith(b"data: [DONE]\n\n")
    assert sim.stats()["completed"] == 1


def test_second_ctrl_c_stops_at_once_without_tracebacks(sim: Sim) -> None:
    """Ctrl-C waits for streams in flight; a second Ctrl-C cuts them and exits now."""
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_GRACEFUL_TIMEOUT": "300"}
    with gateway_server(sim.base_url, env=env) as gw:
        sim.reset()
        body = dict(CHAT_BODY, stream=True, max_tokens=3000)
        headers = {"x-sim-token-delay": "0.05"}  # 150 s of tokens: longer than the test
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", gw.url + URL, json=body, headers=headers) as r:
                chunks = r.iter_raw()
                received = next(chunks)
                gw.send_signal(signal.SIGINT)
                _wait_for_log(gw, "Waiting for connections to close")
                gw.send_signal(signal.SIGINT)
                with pytest.raises(httpx.RemoteProtocolError):
                    for chunk in chunks:
                        received += chunk
        assert b"[DONE]" not in received
        # Far inside the 300 s grace period: the second signal did not wait for it.
        assert gw.proc is not None and gw.proc.wait(30) in (0, -signal.SIGINT)
        assert sim.wait_aborted(1, timeout=10)["aborted"] == 1
        log = gw.log_text()
        assert "second stop signal: stopping now" in log
        assert "Traceback" not in log and "CancelledError" not in log, log


def test_designed_cut_logs_one_gateway_line(sim: Sim) -> None:
    """An upstream that dies mid-stream: the gateway names the cause, uvicorn stays quiet."""
    from tests.support.rawupstream import RawUpstream

    with (
        RawUpstream("reset_after") as upstream,
        gateway_server(upstream.base_url, env=GATEWAY_ENV) as gw,
    ):
        body = dict(CHAT_BODY, stream=True)
        with httpx.Client(timeout=30) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                with client.stream("POST", gw.url + URL, json=body) as r:
                    for _ in r.iter_raw():
                        pass
        _wait_for_log(gw, "upstream failed mid-response")
        log = gw.log_text()
        assert "ASGI callable returned without completing response" not in log
        assert log.count("upstream failed mid-response") == 1
