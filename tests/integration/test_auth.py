"""API-key auth through the real gateway, and what reaches the upstream."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import openai
import pytest

from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, KEY, Sim
from tests.support.servers import ServerProcess, gateway_server


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": f"Bearer {KEY}"}, 200),
        ({"Authorization": f"bearer {KEY}"}, 200),
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, 401),
        ({"Authorization": f"Bearer {KEY}x"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"Authorization": KEY}, 401),
    ],
)
def test_key_is_required_on_every_route(
    auth_gateway: ServerProcess, clean_sim: Sim, headers, status
) -> None:
    for method, path, body in [
        ("POST", "/v1/chat/completions", CHAT_BODY),
        ("GET", "/v1/models", None),
        ("GET", "/models", None),
    ]:
        r = httpx.request(method, auth_gateway.url + path, json=body, headers=headers, timeout=10)
        assert r.status_code == status, (path, r.text)
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert set(error) >= {"message", "type", "code"}
            assert error["type"] == "authentication_error"
            assert KEY not in r.text
    if status == 401:
        assert clean_sim.receipts(None) == 0


def test_health_is_exempt(auth_gateway: ServerProcess) -> None:
    r = httpx.get(auth_gateway.url + "/health", timeout=10)
    assert r.status_code == 200
    assert r.json()["vllm_available"] is True


def test_client_key_never_reaches_upstream_which_gets_vllm_api_key(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_API_KEY": KEY, "VLLM_API_KEY": "upstream-secret"}
    with gateway_server(sim.base_url, env=env) as gw:
        sim.reset()
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json=CHAT_BODY,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=10,
        )
        assert r.status_code == 200
        seen = sim.stats()["last_request"]["headers"]
        auth = [v for n, v in seen if n == "authorization"]
        assert auth == ["Bearer upstream-secret"]
        assert KEY not in str(seen)
        assert KEY not in gw.log_text()


def test_openai_sdk_with_key(auth_gateway: ServerProcess, clean_sim: Sim) -> None:
    good = openai.OpenAI(base_url=auth_gateway.url + "/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(**CHAT_BODY).choices[0].message.content
    bad = openai.OpenAI(base_url=auth_gateway.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**CHAT_BODY)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_guide_curl_openai_example(auth_gateway: ServerProcess, clean_sim: Sim) -> None:
    """The guide's ``curl -X POST .../v1/chat/completions`` example, host and key as given."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            auth_gateway.url + "/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-d",
            '{"model": "meta-llama/Llama-3.1-70B-Instruct", "messages": [{"role": "user", '
            '"content": "Hello!"}], "temperature": 0.7, "max_tokens": 100}',
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    reply = httpx.Response(200, content=out.stdout).json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"]
    health = subprocess.run(
        ["curl", "-sS", auth_gateway.url + "/health"], capture_output=True, check=True, timeout=30
    )
    assert httpx.Response(200, content=health.stdout).json()["status"] == "healthy"
    models = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: Bearer {KEY}", auth_gateway.url + "/models"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert httpx.Response(200, content=models.stdout).json()["object"] == "list"
