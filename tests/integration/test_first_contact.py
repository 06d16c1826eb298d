"""First contact: what the gateway says at start-up, and why ``/health`` is unhealthy.

Real processes: ``python -m proxy`` (and ``--demo``) with the settings a newcomer gets
wrong, the simulator, and raw-socket upstreams for the faults it cannot show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from proxy.config import ENV_VARS
from proxy.version import VERSION
from tests.integration.conftest import GATEWAY_ENV, MODEL, Sim
from tests.support.rawupstream import RawUpstream
from tests.support.servers import ServerProcess, free_port, gateway_server, sim_server

pytestmark = pytest.mark.timeout(90)


def _run(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _wait_for(server: ServerProcess, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log_text()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log:\n{server.log_text()}")


def _startup_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if f"vllm-wrapper {VERSION} on " in line]


# ---- point 1: --version and --help ------------------------------------------------------


def test_version(tmp_path) -> None:
    result = _run(["--version"], {}, tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"vllm-wrapper {VERSION}"


def test_help_lists_every_setting_with_meaning_and_default(tmp_path) -> None:
    result = _run(["--help"], {}, tmp_path)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for var, spec in ENV_VARS.items():
        line = next((x for x in lines if x.split()[:1] == [var]), None)
        assert line is not None, f"{var} missing from --help"
        assert spec.meaning in line and f"(default: {spec.default_text()})" in line
    assert "check" in result.stdout  # the subcommand is listed


# ---- point 2: settings that used to turn auth off silently ------------------------------


@pytest.mark.parametrize("var", ["VLLM_WRAPPER_API_KEY", "VLLM_API_KEY"])
def test_blank_key_stops_startup(tmp_path, var: str) -> None:
    result = _run(["--env-file", ""], {var: "   "}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and var in lines[0] and "blank" in lines[0], result.stderr


def test_missing_env_file_stops_startup(tmp_path) -> None:
    missing = tmp_path / "nope.env"
    result = _run(["--env-file", str(missing)], {}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "not found" in lines[0]
    result = _run([], {"VLLM_WRAPPER_ENV_FILE": str(missing)}, tmp_path)
    assert result.returncode == 2 and "not found" in result.stderr


def test_startup_line_warnings_and_unknown_variables(sim: Sim, tmp_path) -> None:
    env_file = tmp_path / "gw.env"
    env_file.write_text(f"VLLM_BASE_URL={sim.base_url}\nVLLM_MODEL={MODEL}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["VLLM_WRAPER_API_KEY"] = "misspelt"  # the typo that left auth off silently
    env["VLLM_WRAPPER_HOST"] = "0.0.0.0"
    args = [sys.executable, "-m", "proxy", "--port", str(port), "--env-file", str(env_file)]
    with ServerProcess(args, port=port, env=env) as gw:
        log = _wait_for(gw, f"vllm-wrapper {VERSION} on ")
        (line,) = _startup_lines(log)
        assert f"on http://0.0.0.0:{port} -> upstream {sim.base_url};" in line
        assert f"model {MODEL};" in line and "auth OFF" in line
        assert f"env file {env_file};" in line and f"docs http://0.0.0.0:{port}/docs" in line
        assert "WARNING" in line or "INFO" in line  # formatted like every other line
        assert (
            "unknown setting VLLM_WRAPER_API_KEY ignored: did you mean VLLM_WRAPPER_API_KEY?" in log
        )
        assert "auth is OFF and the gateway listens on 0.0.0.0" in log
        # printed after the socket is bound: uvicorn's own "running on" comes first
        assert log.index("Uvicorn running on") < log.index(line)


def test_startup_line_with_auth_on(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_API_KEY": "k-123"}
    with gateway_server(sim.base_url, env=env) as gw:
        log = _wait_for(gw, f"vllm-wrapper {VERSION} on ")
        (line,) = _startup_lines(log)
        assert "auth on (1 key)" in line and "env file none" in line
        assert "k-123" not in log
        assert "auth is OFF" not in log  # loopback and keyed: nothing to warn about


def test_demo_binds_loopback_and_says_so_once(tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    args = [sys.executable, "-m", "proxy", "--demo", "--port", str(port), "--env-file", ""]
    with ServerProcess(args, port=port, env=env) as gw:
        log = _wait_for(gw, f"vllm-wrapper {VERSION} on ")
        (line,) = _startup_lines(log)
        assert f"on http://127.0.0.1:{port} -> upstream simulated vLLM (demo) at" in line
        assert "auth OFF" in line
        assert "demo:" not in log  # the old two-line banner is gone
        assert "auth is OFF and the gateway listens" not in log  # loopback


# ---- point 3: /health says why ----------------------------------------------------------


def _health(gw: ServerProcess) -> dict:
    r = httpx.get(gw.url + "/health", timeout=15)
    assert r.status_code == 200
    return r.json()


def test_health_reason_connection_refused_and_down_up_logged_once(dead_upstream: str) -> None:
    port = int(dead_upstream.rsplit(":", 1)[1].split("/")[0])
    with gateway_server(dead_upstream, env=GATEWAY_ENV) as gw:
        for _ in range(3):
            body = _health(gw)
            assert body["status"] == "unhealthy" and body["vllm_available"] is False
            assert set(body) == {"status", "vllm_available", "model", "base_url", "reason"}
            assert body["reason"].startswith(f"cannot connect to 127.0.0.1:{port}")
            assert "refused" in body["reason"].lower()
        with sim_server(port=port):
            body = _health(gw)
            assert body["status"] == "healthy" and "reason" not in body
            _health(gw)
        log = _wait_for(gw, "is available again")
        assert log.count("is unavailable: cannot connect") == 1
        assert log.count("is available again") == 1


def test_health_reason_upstream_refuses_the_key() -> None:
    with (
        sim_server("--api-key", "upstream-secret") as upstream,
        gateway_server(upstream.url + "/v1", env=GATEWAY_ENV) as gw,
    ):
        body = _health(gw)
        assert body["reason"] == (
            "upstream answered 401: it refused the gateway's credentials (check VLLM_API_KEY)"
        )


def test_health_reason_base_url_without_v1_and_startup_warning(sim: Sim) -> None:
    with gateway_server(sim.url, env=GATEWAY_ENV) as gw:
        body = _health(gw)
        assert body["reason"] == (
            "upstream answered 404 for /models: does VLLM_BASE_URL end in /v1?"
        )
        log = _wait_for(gw, "does not end in /v1")
        assert f"VLLM_BASE_URL={sim.url} does not end in /v1" in log


def test_health_reason_model_not_served(sim: Sim) -> None:
    with gateway_server(sim.base_url, env={**GATEWAY_ENV, "VLLM_MODEL": "not-here"}) as gw:
        body = _health(gw)
        assert body["status"] == "unhealthy"
        assert body["reason"] == (
            f"model not-here is not served (VLLM_MODEL); it serves [{MODEL}, tiny-llama]"
        )


def test_health_reason_timeout() -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_HEALTH_TIMEOUT": "0.5"}
    with RawUpstream("silent") as upstream, gateway_server(upstream.base_url, env=env) as gw:
        body = _health(gw)
        assert body["reason"] == "no answer within 0.5 s (VLLM_WRAPPER_HEALTH_TIMEOUT)"


def test_sim_and_gateway_defaults_work_together() -> None:
    """README: ``python -m proxy.sim`` plus ``python -m proxy``, no settings."""
    with sim_server() as upstream, gateway_server(upstream.url + "/v1") as gw:
        assert _health(gw)["status"] == "healthy"
        r = httpx.post(
            gw.url + "/chat", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30
        )
        assert r.status_code == 200 and r.json()["content"]


# ---- point 4: GET / and the missing /v1 --------------------------------------------------


def test_index_and_missing_v1_hint(gateway: ServerProcess) -> None:
    r = httpx.get(gateway.url + "/", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "vllm-wrapper" and body["version"] == VERSION
    assert body["links"]["docs"] == "/docs" and body["links"]["health"] == "/health"
    for path in ("/chat/completions", "/completions", "/embeddings"):
        r = httpx.post(gateway.url + path, json={}, timeout=10)
        assert r.status_code == 404
        error = r.json()["error"]
        assert "add /v1 to your client's base URL" in error["message"]
        assert error["code"] == "not_found"


# ---- point 4: errors that used to mislead -----------------------------------------------

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_upstream_refusing_the_gateways_key() -> None:
    """/chat and /models: a 502 about the gateway's key; /v1: vLLM's 401 as is, logged."""
    with (
        sim_server("--api-key", "upstream-secret") as upstream,
        gateway_server(upstream.url + "/v1", env=GATEWAY_ENV) as gw,
    ):
        for method, path, body in (("POST", "/chat", HI), ("GET", "/models", None)):
            r = httpx.request(method, gw.url + path, json=body, timeout=15)
            assert r.status_code == 502, path
            error = r.json()["error"]
            assert error["code"] == "upstream_auth_refused"
            assert (
                "VLLM_API_KEY" in error["message"] and "not about your API key" in error["message"]
            )
        direct = httpx.post(upstream.url + "/v1/chat/completions", json=HI, timeout=15)
        r = httpx.post(
            gw.url + "/v1/chat/completions", json=HI, headers={"x-request-id": "k401"}, timeout=15
        )
        assert r.status_code == 401 and r.content == direct.content
        log = _wait_for(gw, "id=k401")
        line = next(x for x in log.splitlines() if "id=k401" in x)
        assert "upstream-401:refused-VLLM_API_KEY" in line


def test_chat_errors_have_one_shape(sim: Sim) -> None:
    with gateway_server(sim.base_url, env=GATEWAY_ENV) as gw:
        r = httpx.post(gw.url + "/chat", json={**HI, "model": "no-such-model"}, timeout=15)
        assert r.status_code == 404
        error = r.json()["error"]
        assert list(error) == ["message", "type", "param", "code"]
        assert error["message"].startswith("The model `no-such-model` does not exist.")
        assert (error["type"], error["param"], error["code"]) == (
            "NotFoundError",
            "model",
            "not_found",
        )
        r = httpx.post(gw.url + "/chat", json={**HI, "max_tokens": 100000}, timeout=15)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    with gateway_server(sim.url, env=GATEWAY_ENV) as no_v1:  # VLLM_BASE_URL without /v1
        r = httpx.post(no_v1.url + "/chat", json=HI, timeout=15)
        assert r.status_code == 404
        message = r.json()["error"]["message"]
        assert "{" not in message and "does VLLM_BASE_URL end in /v1?" in message


def test_upstream_failures_name_the_cause_and_the_numbers(dead_upstream: str) -> None:
    env = {**GATEWAY_ENV, "VLLM_MAX_RETRIES": "0"}
    with gateway_server(dead_upstream, env=env) as gw:
        r = httpx.post(gw.url + "/chat", json=HI, timeout=15)
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "connection refused" in message.lower() and "ssl:" not in message
    env = {**GATEWAY_ENV, "VLLM_TIMEOUT": "0.5", "VLLM_WRAPPER_HEALTH_TIMEOUT": "0.3"}
    with RawUpstream("silent") as upstream, gateway_server(upstream.base_url, env=env) as gw:
        r = httpx.post(gw.url + "/chat", json=HI, timeout=15)
        assert r.status_code == 504
        assert "VLLM_TIMEOUT=0.5 s" in r.json()["error"]["message"]


def test_index_needs_no_key(auth_gateway: ServerProcess) -> None:
    r = httpx.get(auth_gateway.url + "/", timeout=10)
    assert r.status_code == 200 and r.json()["name"] == "vllm-wrapper"
    assert httpx.post(auth_gateway.url + "/chat", json={}, timeout=10).status_code == 401
