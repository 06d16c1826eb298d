"""Every curl and Python example of the user's guide, run as written (host aside).

Against two set-ups: the README's demo command (``python -m proxy --demo``,
no key: what a newcomer pastes into), and the gateway in front of the
simulator with the guide's own key (``your-service-api-key``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest

from proxy.sse import SSEDecoder
from tests.integration.conftest import KEY, MODEL
from tests.support.guide import at, curl_examples, python_examples
from tests.support.servers import ServerProcess, free_port, python_server

CURL = curl_examples()
PY = python_examples()
PY_NON_STREAM, PY_STREAM, PY_SDK, PY_HELPER = PY
CHAT_KEYS = {"content", "model", "usage", "finish_reason"}


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    port = free_port()
    args = ["-m", "proxy", "--demo", "--host", "127.0.0.1", "--port", str(port), "--env-file", ""]
    env = {"VLLM_WRAPPER_API_KEY": "", "VLLM_MODEL": MODEL}
    with python_server(args, port=port, env=env, name="demo") as server:
        yield server


@pytest.fixture(params=["demo", "auth_gateway"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    return request.getfixturevalue(request.param)


def run(args: list[str], timeout: float = 60) -> str:
    done = subprocess.run(args, capture_output=True, timeout=timeout, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def curl(code: str, server: ServerProcess) -> str:
    # Quiet (no progress meter) and failing on an HTTP error; otherwise as written.
    code = at(code, server.url).replace("curl ", "curl -sS --fail-with-body ", 1)
    return run(["bash", "-c", code])


def check_usage(usage: dict) -> None:
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_curl_health_and_models(demo: ServerProcess) -> None:
    health = orjson.loads(curl(CURL[0], demo))
    assert health["status"] == "healthy" and health["vllm_available"] is True
    assert health["model"] == MODEL
    models = orjson.loads(curl(CURL[1], demo))
    assert MODEL in [m["id"] for m in models["data"]]


def test_curl_chat_non_streaming(server: ServerProcess) -> None:
    answer = orjson.loads(curl(CURL[2], server))
    assert set(answer) == CHAT_KEYS
    assert answer["model"] == MODEL and answer["finish_reason"] == "stop"
    assert "你好，请介绍一下你自己" in answer["content"]  # the simulator echoes the question
    check_usage(answer["usage"])


def test_curl_chat_streaming(server: ServerProcess) -> None:
    raw = curl(CURL[3], server).encode()
    events = SSEDecoder().feed(raw)
    texts = [e.data for e in events if e.event == "message"]
    assert texts[-1] == "[DONE]" and len(texts) > 2
    (usage,) = [orjson.loads(e.data) for e in events if e.event == "usage"]
    assert usage["finish_reason"] == "stop" and usage["model"] == MODEL
    check_usage({k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")})
    # one event per generated token; the end-of-sequence token has no text
    assert len(texts) - 1 == usage["completion_tokens"] - 1
    assert "写一首短诗" in "".join(texts[:-1])


def test_curl_openai_compatible(server: ServerProcess) -> None:
    body = orjson.loads(curl(CURL[4], server))
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"]["content"]


def python(code: str, server: ServerProcess) -> str:
    return run([sys.executable, "-c", at(code, server.url)])


def test_python_non_streaming(server: ServerProcess) -> None:
    lines = python(PY_NON_STREAM, server).splitlines()
    assert lines[0].startswith("回复: ") and "什么是机器学习" in lines[0]
    assert lines[1] == f"模型: {MODEL}"
    assert lines[2].startswith("Token使用: ")
    check_usage(ast.literal_eval(lines[2].removeprefix("Token使用: ")))


def test_python_streaming_line_reader(server: ServerProcess) -> None:
    out = python(PY_STREAM, server)
    # The guide's reader prints each 'data: ' line; the usage event ('data:{...}') and
    # [DONE] are not printed. It drops line breaks (those are multi-line events).
    assert out.startswith("你问的是“写一个Python函数计") and "```python" in out
    assert "prompt_tokens" not in out and "[DONE]" not in out
    assert out.endswith("\n")


def test_python_openai_sdk(server: ServerProcess) -> None:
    out = python(PY_SDK, server)
    assert out.startswith("你问的是“介绍一下Python的装")


def test_python_integration_helper(server: ServerProcess) -> None:
    script = (
        PY_HELPER
        + "\nimport asyncio\n"
        + "print(asyncio.run(call_vllm_wrapper([{'role': 'user', 'content': 'Hello there'}])))"
    )
    out = python(script, server)
    assert out.startswith('You asked about "Hello there".')


def test_the_guide_key_is_required_on_the_keyed_gateway(auth_gateway: ServerProcess) -> None:
    """Sanity: the examples above passed the auth check, not a disabled one."""
    import httpx

    r = httpx.post(
        auth_gateway.url + "/chat", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 401
    assert KEY in PY_NON_STREAM
