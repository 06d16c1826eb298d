"""Token accounting against each upstream (the simulator and, with ``-m vllm``, a real
vLLM): for a key with token limits the gateway asks for the usage chunk and strips it,
and the client still gets the upstream's own bytes for its request, with the tokens
charged exactly as the upstream counted them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conformance.conftest import GATEWAY_ENV, MODEL, Upstream
from tests.support.servers import ServerProcess, gateway_server
from tests.support.wire import post_raw

KEY = "limited-key"
BODIES = {
    "chat": (
        "/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi!"}],
            "max_tokens": 9,
            "temperature": 0,
            "stream": True,
        },
    ),
    "completions": (
        "/completions",
        {"model": MODEL, "prompt": "def f():", "max_tokens": 9, "temperature": 0, "stream": True},
    ),
}


@pytest.fixture(scope="module")
def limited(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    config = tmp / "gateway.toml"
    config.write_text(
        f'[[keys]]\nname = "t"\nkey = "{KEY}"\ntpm = 100000000\n'
        f'[state]\npath = "{tmp / "state.db"}"\n'
    )
    with gateway_server(upstream.base_url, "--config", str(config), env=GATEWAY_ENV) as gw:
        yield gw


def _ids(raw: bytes) -> bytes:
    # Only what differs per request: the fingerprint's place and value must match.
    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', rb'"\1":X', raw)


def _tokens(gw: ServerProcess) -> int:
    r = httpx.get(gw.url + "/usage", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    return r.json()["keys"][0]["usage"]["tokens_per_minute"]


@pytest.mark.parametrize("usage", [False, True], ids=["no-usage", "include-usage"])
@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_stream_bytes_and_tokens(
    limited: ServerProcess, upstream: Upstream, kind: str, usage: bool
) -> None:
    path, body = BODIES[kind]
    body = dict(body)
    if usage:
        body["stream_options"] = {"include_usage": True}
    before = _tokens(limited)
    r, via = post_raw(limited.url + "/v1" + path, body, {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, via
    assert r.headers["x-ratelimit-limit-tokens"] == "100000000"
    _, direct = post_raw(upstream.base_url + path, body, upstream.auth)
    assert _ids(via) == _ids(direct)
    assert (b'"usage":' in via) is usage
    # What the upstream counts for this request, asked directly with usage on.
    counted = dict(body, stream_options={"include_usage": True})
    _, with_usage = post_raw(upstream.base_url + path, counted, upstream.auth)
    total = int(re.findall(rb'"total_tokens":(\d+)', with_usage)[-1])
    deadline = time.monotonic() + 10
    while _tokens(limited) - before != total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tokens(limited) - before == total
