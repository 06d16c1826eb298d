from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.servers import ServerProcess, free_port, gateway_server, sim_server

MODEL = "meta-llama/Llama-3.1-70B-Instruct"
KEY = "your-service-api-key"


class Sim:
    """Client for the simulator's control API (``/_sim/*``)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.url = server.url
        self.base_url = server.url + "/v1"

    def reset(self) -> None:
        httpx.post(self.url + "/_sim/reset", timeout=5).raise_for_status()

    def faults(self, **faults: object) -> None:
        httpx.post(self.url + "/_sim/faults", json=faults, timeout=5).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(self.url + "/_sim/stats", timeout=5).json()

    def receipts(self, path: str | None = "/v1/chat/completions") -> int:
        """Requests the simulator received on ``path`` (``None``: on any path but
        ``/v1/models``). Counted so because the gateway polls ``GET /v1/models`` by itself
        now and then (the metrics' model list), which is no client's request."""
        stats = self.stats()
        if path is None:
            return stats["requests"] - stats["by_path"].get("/v1/models", 0)
        return stats["by_path"].get(path, 0)

    def wait_aborted(self, n: int = 1, timeout: float = 5.0) -> dict:
        r = httpx.get(
            self.url + "/_sim/wait_aborted",
            params={"n": n, "timeout": timeout},
            timeout=timeout + 5,
        )
        return r.json()


@pytest.fixture(scope="session")
def sim() -> Iterator[Sim]:
    with sim_server("--model", f"{MODEL},tiny-llama") as server:
        yield Sim(server)


@pytest.fixture
def clean_sim(sim: Sim) -> Sim:
    sim.reset()
    return sim


GATEWAY_ENV = {
    "VLLM_MODEL": MODEL,
    "VLLM_WRAPPER_RETRY_BACKOFF": "0.01",
    "VLLM_WRAPPER_RETRY_BACKOFF_MAX": "0.05",
    "VLLM_TIMEOUT": "10",
}


@pytest.fixture(scope="session")
def gateway(sim: Sim) -> Iterator[ServerProcess]:
    """The gateway without auth in front of the shared simulator."""
    with gateway_server(sim.base_url, env=GATEWAY_ENV) as server:
        yield server


@pytest.fixture(scope="session")
def auth_gateway(sim: Sim) -> Iterator[ServerProcess]:
    """The gateway with ``VLLM_WRAPPER_API_KEY`` set, as in the user's guide."""
    with gateway_server(sim.base_url, env={**GATEWAY_ENV, "VLLM_WRAPPER_API_KEY": KEY}) as server:
        yield server


@pytest.fixture
def dead_upstream() -> str:
    """A base URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/v1"


CHAT_BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello! How are you?"}],
    "max_tokens": 8,
    "temperature": 0,
}
