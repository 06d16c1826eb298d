"""``python -m bench.fastup``, the benchmark's fast upstream, as a real process: its
answers are valid for httpx and the openai SDK, and the gateway relays them (the
usage chunk it asks for on a key with token limits included)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.servers import ServerProcess, free_port, gateway_server, python_server

MODEL = "tiny-llama"
KEY = "fastup-test-key"


@pytest.fixture(scope="module")
def fastup() -> Iterator[ServerProcess]:
    port = free_port()
    args = ["-m", "bench.fastup", "--port", str(port), "--tokens", "7", "--model", MODEL]
    with python_server(args, port=port, name="fastup") as server:
        yield server


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]


def test_answers_are_valid_for_the_sdk(fastup: ServerProcess) -> None:
    c = client(fastup.url)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 7
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 7
    done = c.completions.create(model=MODEL, prompt="hi")
    assert done.choices[0].text and done.usage and done.usage.completion_tokens == 7
    assert [m.id for m in c.models.list()] == [MODEL]

    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)

    chunks = list(
        c.completions.create(
            model=MODEL, prompt="hi", stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    assert "".join(ch.choices[0].text for ch in chunks[:-1]) == done.choices[0].text


def test_wire_details(fastup: ServerProcess) -> None:
    url = fastup.url
    with httpx.Client(timeout=10) as h:
        r = h.post(
            url + "/v1/chat/completions",
            content=b'{"stream": true, "stream_options": {"include_usage": true}}',
            headers={"x-sim-tokens": "3", "x-sim-delay-ms": "5"},
        )
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = events(r.text)
        assert data[-1] == "[DONE]"
        tokens = [json.loads(d) for d in data[:-1]]
        assert len(tokens) == 1 + 3 + 1  # role, three tokens, usage
        assert tokens[-1]["usage"]["completion_tokens"] == 3
        assert h.get(url + "/health").status_code == 200
        metrics = h.get(url + "/metrics")
        assert "vllm:num_requests_running" in metrics.text
        missing = h.get(url + "/nope")
        assert missing.status_code == 404 and missing.json()
        assert h.post(url + "/v1/models").status_code == 405
        assert h.get(url + "/_fastup/stats").json()["streams"] >= 1
        chunked = h.post(
            url + "/v1/completions", content=iter([b'{"prompt":"x"}']), headers={"x": "y"}
        )  # an iterator body goes out chunked
        assert chunked.status_code == 400


def test_gateway_relays_fastup(fastup: ServerProcess, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[keys]]\nname = "bench"\nkey = "{KEY}"\ntpm = 1000000000\n\n'
        '[state]\nbackend = "memory"\n'
    )
    env = {"VLLM_MODEL": MODEL, "VLLM_WRAPPER_ACCESS_LOG": "false"}
    with gateway_server(fastup.url + "/v1", "--config", str(config), env=env) as gw:
        c = client(gw.url, KEY)
        done = c.completions.create(model=MODEL, prompt="hi")
        assert done.usage is not None and done.usage.completion_tokens == 7
        # The key has a token limit: the gateway asks fastup for the usage chunk and
        # strips it, so the client sees the stream it asked for, without usage.
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(ch.usage is None for ch in chunks)
        usage = httpx.get(gw.url + "/usage", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert usage["keys"][0]["usage"]["tokens_per_minute"] >= 2 * 7
