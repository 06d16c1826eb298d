"""The gateway under ASGI servers other than uvicorn, and ``python -m proxy --workers N``."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, MODEL, Sim
from tests.support.servers import ROOT, ServerProcess, free_port, gateway_server
from tests.support.streams import check_disconnect_aborts, check_streams_incrementally

BIN = Path(sys.executable).parent


def _command(server: str, port: int) -> list[str]:
    if server == "hypercorn":
        # HTTP/1.1 and HTTP/2 (h2c with prior knowledge; h2 over TLS with --certfile).
        app = "proxy:create_app()"
        return [sys.executable, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{port}"]
    # granian (a Rust server); the factory reads settings from the environment.
    app_args = ["--interface", "asgi", "--factory", "proxy:create_app"]
    return [str(BIN / "granian"), *app_args, "--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture(scope="module", params=["hypercorn", "granian"])
def other_server(request: pytest.FixtureRequest, sim: Sim) -> Iterator[ServerProcess]:
    port = free_port()
    env = {**GATEWAY_ENV, "VLLM_BASE_URL": sim.base_url, "VLLM_WRAPPER_ENV_FILE": ""}
    with ServerProcess(_command(request.param, port), port=port, env=env, name=request.param) as s:
        yield s
    assert "opened outside the lifespan" not in s.log_text()


def test_streams_incrementally(other_server: ServerProcess, clean_sim: Sim) -> None:
    url = other_server.url + "/v1/chat/completions"
    check_streams_incrementally(url, clean_sim, CHAT_BODY)
    health = httpx.get(other_server.url + "/health", timeout=10).json()
    assert health["vllm_available"] is True


def test_client_disconnect_aborts_upstream(other_server: ServerProcess, clean_sim: Sim) -> None:
    check_disconnect_aborts(other_server.url + "/v1/chat/completions", clean_sim, CHAT_BODY)


def test_http2_streams_incrementally(other_server: ServerProcess, clean_sim: Sim) -> None:
    url = other_server.url + "/v1/chat/completions"
    body = check_streams_incrementally(url, clean_sim, CHAT_BODY, http2=True)
    assert body.count(b"data: ") > 5


# ---- python -m proxy --workers N ------------------------------------------


def test_workers_serve_and_all_start(sim: Sim) -> None:
    with gateway_server(sim.base_url, "--workers", "2", env=GATEWAY_ENV) as gw:
        for _ in range(8):
            r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
            assert r.status_code == 200
            assert r.json()["model"] == MODEL
        assert httpx.get(gw.url + "/health", timeout=10).json()["vllm_available"] is True
        # Each worker logs its start-up; wait (bounded) for both.
        pids: set[str] = set()
        for _ in range(200):
            pids = set(re.findall(r"Started server process \[(\d+)\]", gw.log_text()))
            if len(pids) >= 2 and gw.log_text().count("Application startup complete") >= 2:
                break
            httpx.get(gw.url + "/health", timeout=10)
        assert len(pids) == 2, gw.log_text()


def test_a_bad_setting_with_workers_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--workers", "2", "--env-file", ""],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "VLLM_TIMEOUT": "soon"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: invalid setting VLLM_TIMEOUT='soon': expected a number"
    ]
