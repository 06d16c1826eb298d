"""The simulator embedded in-process (``create_sim_app``), also under a mount prefix."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from proxy.sim import SimOptions, create_sim_app


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("prefix", ["", "/llm"])
async def test_embedded_app(prefix: str) -> None:
    sim = create_sim_app(SimOptions(models=("m1", "m2"), max_model_len=128, tokens=5))
    app = Starlette(routes=[Mount(prefix, app=sim)]) if prefix else sim
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim" + prefix) as c:
        assert (await c.get("/health")).status_code == 200
        models = (await c.get("/v1/models")).json()
        assert [m["max_model_len"] for m in models["data"]] == [128, 128]
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "m2", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.json()["usage"]["completion_tokens"] == 5  # --tokens forces the length
        assert r.json()["model"] == "m2"
        assert (await c.get("/nope")).json() == {"detail": "Not Found"}
    assert sim.stats.completed == 1
    assert sim.stats.by_path == {"/v1/models": 1, "/v1/chat/completions": 1}


def test_options_validate() -> None:
    with pytest.raises(ValueError):
        SimOptions(models=())
    with pytest.raises(ValueError):
        SimOptions(tokens=0)
    with pytest.raises(ValueError):
        SimOptions(token_delay=-1)
