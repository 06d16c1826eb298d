"""The gateway mounted under ``/llm`` in a Starlette and in a FastAPI host app.

The hosts are ``examples/mount_*.py`` (the README shows them), served by uvicorn as real
processes in front of the simulator.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import proxy
from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, KEY, MODEL, Sim
from tests.support.servers import ServerProcess, free_port
from tests.support.streams import check_disconnect_aborts, check_streams_incrementally
from tests.support.wsclient import chat_socket, collect, next_message, send

AUTH = {"Authorization": f"Bearer {KEY}"}
LAZY_WARNING = "opened outside the lifespan"


@pytest.fixture(scope="module", params=["mount_starlette", "mount_fastapi"])
def host(request: pytest.FixtureRequest, sim: Sim) -> Iterator[ServerProcess]:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", f"examples.{request.param}:app"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    env = {
        **GATEWAY_ENV,
        "VLLM_BASE_URL": sim.base_url,
        "VLLM_WRAPPER_API_KEY": KEY,
        "VLLM_WRAPPER_ENV_FILE": "",
    }
    server = ServerProcess(args, port=port, env=env, health_path="/llm/health", name="host")
    with server:
        yield server
    assert LAZY_WARNING not in server.log_text()


def test_health_under_the_prefix_needs_no_key(host: ServerProcess, clean_sim: Sim) -> None:
    r = httpx.get(host.url + "/llm/health", timeout=10)
    assert r.status_code == 200
    assert r.json() == {
        "status": "healthy",
        "vllm_available": True,
        "model": MODEL,
        "base_url": clean_sim.base_url,
    }
    # The host's own routes are untouched by the gateway's auth.
    assert httpx.get(host.url + "/hello", timeout=10).json() == {"app": "host"}


def test_auth_under_the_prefix(host: ServerProcess, clean_sim: Sim) -> None:
    for path in ("/llm/v1/models", "/llm/models"):
        r = httpx.get(host.url + path, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        r = httpx.get(host.url + path, headers=AUTH, timeout=10)
        assert r.status_code == 200
        assert [m["id"] for m in r.json()["data"]] == [MODEL, "tiny-llama"]
    # The upstream got the gateway's own path (prefix stripped), not the client's key.
    last = clean_sim.stats()["last_request"]
    assert last["path"] == "/v1/models"
    assert "authorization" not in dict(last["headers"])


def test_stream_through_the_mount(host: ServerProcess, clean_sim: Sim) -> None:
    check_streams_incrementally(host.url + "/llm/v1/chat/completions", clean_sim, CHAT_BODY, AUTH)


def test_openai_sdk_through_the_mount(host: ServerProcess, clean_sim: Sim) -> None:
    client = openai.OpenAI(base_url=host.url + "/llm/v1", api_key=KEY, max_retries=0)
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**CHAT_BODY, stream=True)
        if c.choices
    ]
    reply = client.chat.completions.create(**CHAT_BODY)
    assert "".join(parts) == reply.choices[0].message.content
    assert reply.usage.completion_tokens == CHAT_BODY["max_tokens"]


def test_disconnect_through_the_mount_aborts_upstream(host: ServerProcess, clean_sim: Sim) -> None:
    check_disconnect_aborts(host.url + "/llm/v1/chat/completions", clean_sim, CHAT_BODY, AUTH)


def test_errors_under_the_prefix_name_the_full_path(host: ServerProcess, clean_sim: Sim) -> None:
    r = httpx.get(host.url + "/llm/nothing-here", headers=AUTH, timeout=10)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "no route for GET /llm/nothing-here"
    r = httpx.post(host.url + "/llm/health", timeout=10)
    assert r.status_code == 405
    r = httpx.get(host.url + "/llm/v1/load_lora_adapter", headers=AUTH, timeout=10)
    assert r.status_code == 403
    assert "/v1/load_lora_adapter" in r.json()["error"]["message"]
    assert clean_sim.receipts(None) == 0
    # Dot segments are judged on the path below the mount, too.
    r = httpx.get(host.url + "/llm/v1/%2e%2e/health", headers=AUTH, timeout=10)
    assert r.status_code == 400


# ---- the lifespan, in process (no streaming involved) ---------------------


def _host(gateway: Starlette, *, run_lifespan: bool) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with proxy.lifespan(gateway):
            yield

    return Starlette(
        routes=[Mount("/llm", app=gateway)], lifespan=lifespan if run_lifespan else None
    )


def test_host_lifespan_opens_and_closes_the_pool(
    sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = proxy.create_app(proxy.Settings(base_url=sim.base_url))
    upstream = gateway.state.upstream
    with caplog.at_level(logging.WARNING, logger="proxy"):
        with TestClient(_host(gateway, run_lifespan=True)) as client:
            assert upstream.is_open
            assert client.get("/llm/health").json()["vllm_available"] is True
        assert not upstream.is_open
    assert LAZY_WARNING not in caplog.text


def test_without_the_host_lifespan_the_pool_opens_lazily_with_a_warning(
    sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = proxy.create_app(proxy.Settings(base_url=sim.base_url))
    with caplog.at_level(logging.WARNING, logger="proxy"):
        with TestClient(_host(gateway, run_lifespan=False)) as client:
            assert not gateway.state.upstream.is_open
            assert client.get("/llm/health").json()["vllm_available"] is True
    assert LAZY_WARNING in caplog.text


def test_index_under_the_prefix_links_below_it(host: ServerProcess) -> None:
    r = httpx.get(host.url + "/llm/", timeout=10)  # public, like /health
    assert r.status_code == 200
    links = r.json()["links"]
    assert links["docs"] == "/llm/docs" and links["health"] == "/llm/health"
    assert httpx.get(host.url + links["health"], timeout=10).status_code == 200


def test_chat_websocket_through_the_mount(host: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(stall_after_chunks=3, stall_seconds=10)
    with chat_socket(host.url + "/llm", KEY) as ws:
        send(ws, type="chat", id=1, messages=[{"role": "user", "content": "hi"}], max_tokens=99)
        assert next_message(ws)["type"] == "delta"
        send(ws, type="cancel", id=1)
        assert collect(ws, {1})[1][-1]["finish_reason"] == "cancelled"
    assert clean_sim.wait_aborted(1)["aborted"] == 1
