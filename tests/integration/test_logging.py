"""The gateway's log lines look the same whichever server runs it (point 5 of issue 13)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import GATEWAY_ENV, Sim
from tests.support.servers import ServerProcess, free_port

pytestmark = pytest.mark.timeout(90)

BIN = Path(sys.executable).parent
# "2026-11-30 10:00:00,000 INFO proxy.access: GET /health 200 ... id=log-xyz"
ACCESS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO proxy\.access: (.*) id=([^ ]+)")
WARNING = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING proxy\.[a-z.]+: (.*)$")


def _command(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", "proxy:app", "--port", str(port)]
    if server == "uvicorn-reload":
        return [sys.executable, "-m", "uvicorn", "proxy:app", "--reload", "--port", str(port)]
    if server == "hypercorn":
        return [
            sys.executable,
            "-m",
            "hypercorn",
            "proxy:create_app()",
            "--bind",
            f"127.0.0.1:{port}",
        ]
    return [
        str(BIN / "granian"),
        *("--interface", "asgi", "--factory", "proxy:create_app"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


def _wait_for(server: ServerProcess, pattern: re.Pattern[str], timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for line in server.log_text().splitlines() if (m := pattern.match(line))]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern.pattern!r}:\n{server.log_text()}")


@pytest.mark.parametrize("server", ["uvicorn", "uvicorn-reload", "hypercorn", "granian"])
def test_access_and_warning_lines_under_any_server(server: str, sim: Sim, tmp_path) -> None:
    port = free_port()
    # A mistyped variable: its warning must come out formatted too.
    env = {**GATEWAY_ENV, "VLLM_BASE_URL": sim.base_url, "VLLM_WRAPPER_ENV_FILE": ""}
    env["VLLM_WRAPER_API_KEY"] = "typo"
    with ServerProcess(_command(server, port), port=port, env=env, name=server) as gw:
        httpx.get(gw.url + "/health", headers={"x-request-id": "log-xyz"}, timeout=10)
        access = _wait_for(gw, re.compile(ACCESS.pattern.replace("([^ ]+)", "(log-xyz)")))
        assert access[0].group(1).startswith("GET /health 200")
        warnings = [m.group(1) for m in _wait_for(gw, WARNING)]
        assert any("VLLM_WRAPER_API_KEY" in w for w in warnings), gw.log_text()
        assert "id=b'" not in gw.log_text()
