"""History is trimmed to the model's context on each upstream (the simulator and, with
``-m vllm``, a real vLLM whose tiny model has a 512-token context): a conversation of
many long turns never makes the upstream refuse a request for being too long."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conformance.conftest import GATEWAY_ENV, MAX_MODEL_LEN, MODEL, Upstream
from tests.support.servers import ServerProcess, gateway_server

TURNS = 12
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def gw(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("history")
    config = tmp / "gateway.toml"
    config.write_text(f'[state]\npath = "{tmp / "state.db"}"\n')
    with gateway_server(upstream.base_url, "--config", str(config), env=GATEWAY_ENV) as server:
        yield server


def test_many_long_turns_always_fit_the_context(gw: ServerProcess, upstream: Upstream) -> None:
    system = {"role": "system", "content": "You are a helpful assistant."}
    conv = httpx.post(gw.url + "/conversations", json={"messages": [system]}, timeout=30).json()
    question = "Please tell me a long story about " + ", ".join(
        f"the {n} dragons of the {n}th mountain" for n in range(5)
    )
    prompts = []
    for i in range(TURNS):
        r = httpx.post(
            gw.url + "/chat",
            json={
                "model": MODEL,
                "conversation_id": conv["id"],
                "messages": [{"role": "user", "content": f"{i}. {question}"}],
                "max_tokens": MAX_TOKENS,
                "ignore_eos": True,  # every answer is MAX_TOKENS long: the context fills fast
                "temperature": 0,
            },
            timeout=120,
        )
        assert r.status_code == 200, (i, r.text)
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS
        assert usage["prompt_tokens"] + MAX_TOKENS <= MAX_MODEL_LEN
        prompts.append(usage["prompt_tokens"])
    # The whole conversation is far longer than the context: without trimming the later
    # turns would have been refused.
    assert TURNS * (prompts[0] + MAX_TOKENS) > 2 * MAX_MODEL_LEN
    assert max(prompts) > 2 * prompts[0]  # history was sent...
    stored = httpx.get(f"{gw.url}/conversations/{conv['id']}", timeout=30).json()
    assert stored["message_count"] == 1 + 2 * TURNS  # ...and all of it is kept in storage
    assert stored["messages"][0] == system
