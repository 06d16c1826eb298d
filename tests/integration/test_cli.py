"""``python -m proxy`` and ``uvicorn proxy:app`` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.integration.conftest import Sim
from tests.support.servers import ServerProcess, free_port


def _run(args: list[str], env: dict[str, str], tmp_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VLLM_WRAPPER_PORT", "abc"),
        ("VLLM_TIMEOUT", "-1"),
        ("VLLM_BASE_URL", "localhost:8000/v1"),
        ("VLLM_MAX_RETRIES", "lots"),
    ],
)
def test_bad_setting_stops_startup_with_one_line(tmp_path, var: str, value: str) -> None:
    result = _run([], {var: value}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert var in lines[0] and "Traceback" not in result.stderr


def test_bad_setting_in_env_file_is_named_too(tmp_path) -> None:
    (tmp_path / ".env").write_text("VLLM_WRAPPER_PORT=eighty\n")
    result = _run([], {}, tmp_path)
    assert result.returncode == 2
    assert "VLLM_WRAPPER_PORT='eighty'" in result.stderr


def test_help_explains_every_option(tmp_path) -> None:
    result = _run(["--help"], {}, tmp_path)
    assert result.returncode == 0
    for option in ("--host", "--port", "--env-file", "--workers", "--demo", "--log-level"):
        assert option in result.stdout
    assert "VLLM_BASE_URL" in result.stdout and "VLLM_WRAPPER_API_KEY" in result.stdout


def test_env_file_settings_are_used(tmp_path, sim: Sim) -> None:
    port = free_port()
    env_file = tmp_path / "gateway.env"
    env_file.write_text(f"VLLM_BASE_URL={sim.base_url}\nVLLM_MODEL=tiny-llama\n")
    args = [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    with ServerProcess([*args, "--env-file", str(env_file)], port=port, env=env) as gw:
        body = httpx.get(gw.url + "/health", timeout=10).json()
        assert body["model"] == "tiny-llama"
        assert body["vllm_available"] is True


def test_uvicorn_proxy_app_works(sim: Sim) -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "proxy:app", "--host", "127.0.0.1"]
    args += ["--port", str(port)]
    env = {"VLLM_BASE_URL": sim.base_url, "VLLM_WRAPPER_ENV_FILE": ""}
    with ServerProcess(args, port=port, env=env) as gw:
        r = httpx.get(gw.url + "/health", timeout=10)
        assert r.json()["status"] == "healthy"
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
