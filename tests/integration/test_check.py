"""``python -m proxy check URL``: the operator's probe, against real gateways."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.conftest import GATEWAY_ENV, KEY
from tests.support.servers import ServerProcess, free_port, gateway_server

pytestmark = pytest.mark.timeout(90)


def _check(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", url, *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _line(out: str, name: str) -> str:
    return next(x for x in out.splitlines() if x.split()[1:2] == [name])


def test_check_a_healthy_gateway_with_auth(auth_gateway: ServerProcess) -> None:
    result = _check(auth_gateway.url, "--key", KEY)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    for name in ("health", "models", "chat", "stream", "auth"):
        assert _line(out, name).split()[0] == "ok", out
    assert "first token after" in _line(out, "stream")
    assert "401" in _line(out, "auth")
    assert out.strip().endswith("verdict: OK — the gateway answers as a client expects")


def test_check_without_the_key_says_to_pass_it(auth_gateway: ServerProcess) -> None:
    result = _check(auth_gateway.url)
    assert result.returncode == 1
    assert "pass --key" in _line(result.stdout, "chat")
    assert "verdict: FAILED" in result.stdout


def test_check_warns_when_auth_is_off(gateway: ServerProcess) -> None:
    result = _check(gateway.url)
    assert result.returncode == 0
    assert _line(result.stdout, "auth").split()[0] == "WARN"
    assert "auth is OFF" in result.stdout


def test_check_a_broken_gateway(dead_upstream: str) -> None:
    env = {**GATEWAY_ENV, "VLLM_MAX_RETRIES": "0"}
    with gateway_server(dead_upstream, env=env) as gw:
        result = _check(gw.url)
    assert result.returncode == 1
    health = _line(result.stdout, "health")
    assert health.startswith("  FAIL") and "cannot connect" in health and "refused" in health
    assert "verdict: FAILED (health, models, chat, stream" in result.stdout


def test_check_nothing_listening() -> None:
    result = _check(f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot connect to 127.0.0.1" in _line(result.stdout, "health")
