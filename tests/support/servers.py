"""Real server processes on loopback for integration tests.

Modelled on vLLM's ``RemoteOpenAIServer``: start a process on a free port,
poll a health URL with a deadline, terminate (then kill) on exit. Output goes
to a log file so a failing test can show what the server said.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A child process serving HTTP on 127.0.0.1:<port>."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int,
        health_path: str = "/health",
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        name: str = "server",
    ) -> None:
        self.args = list(args)
        self.port = port
        self.health_path = health_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix=f"{name}-", suffix=".log", delete=False
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        return self._log.name

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                r = httpx.get(self.url + self.health_path, timeout=1.0)
                if r.status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {self.startup_timeout}s:\n{self.log_text()}")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_server(
    module_args: Sequence[str], *, port: int, env: Mapping[str, str] | None = None, **kw: object
) -> ServerProcess:
    """A ``python -m ...`` server using the interpreter running the tests."""
    return ServerProcess([sys.executable, *module_args], port=port, env=env, **kw)  # type: ignore[arg-type]


def sim_server(*extra: str, port: int | None = None, **kw: object) -> ServerProcess:
    """The simulated vLLM (``python -m proxy.sim``) on a free port."""
    port = port or free_port()
    args = ["-m", "proxy.sim", "--host", "127.0.0.1", "--port", str(port), *extra]
    return python_server(args, port=port, name="sim", **kw)  # type: ignore[arg-type]


def gateway_server(
    upstream: str, *extra: str, env: Mapping[str, str] | None = None, port: int | None = None, **kw
) -> ServerProcess:
    """The gateway (``python -m proxy``) on a free port in front of ``upstream`` (a base URL)."""
    port = port or free_port()
    full_env = {"VLLM_BASE_URL": upstream, "VLLM_WRAPPER_API_KEY": "", **(env or {})}
    args = ["-m", "proxy", "--host", "127.0.0.1", "--port", str(port), "--env-file", "", *extra]
    return python_server(args, port=port, env=full_env, name="gateway", **kw)
