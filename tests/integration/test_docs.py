"""/docs and /openapi.json: offline assets, a valid OpenAPI document, and under a prefix."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from openapi_spec_validator import validate

from tests.integration.conftest import GATEWAY_ENV, KEY, Sim
from tests.support.servers import ServerProcess, free_port, python_server

_REFS = re.compile(r'(?:src|href|data-spec-url)="([^"]+)"')
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
}


def check_docs(base: str, prefix: str = "") -> dict:
    """Load the page and everything it references from ``base``; return the schema."""
    page = httpx.get(base + prefix + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = sorted(set(_REFS.findall(page.text)))
    assert len(refs) == 5, refs  # css, icon, schema, bundle, init
    for ref in refs:
        assert ref.startswith(prefix + "/"), ref  # same origin, under the prefix: no CDN
        r = httpx.get(base + ref, timeout=10)
        assert r.status_code == 200, ref
        assert r.headers["content-type"].startswith(_TYPES[ref[ref.rindex(".") :]]), ref
    bundle = httpx.get(base + prefix + "/docs/assets/swagger-ui-bundle.js", timeout=10).text
    assert "SwaggerUIBundle" in bundle and len(bundle) > 500_000
    init = httpx.get(base + prefix + "/docs/assets/docs.js", timeout=10).text
    assert "http" not in init and "validatorUrl: null" in init  # no online validator badge
    schema = httpx.get(base + prefix + "/openapi.json", timeout=10).json()
    validate(schema)
    return schema


def test_docs_render_offline_and_need_no_key(auth_gateway: ServerProcess) -> None:
    schema = check_docs(auth_gateway.url)
    assert "servers" not in schema
    paths = schema["paths"]
    for path in [
        "/chat",
        "/health",
        "/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/{path}",
    ]:
        assert path in paths, path
    chat = paths["/chat"]["post"]
    assert set(chat["requestBody"]["content"]["application/json"]["examples"]) == {"chat", "stream"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert schema["security"] == [{"bearerAuth": []}]  # the key is needed to call the API
    assert paths["/health"]["get"]["security"] == []
    # The docs are public; the API is not.
    assert httpx.post(auth_gateway.url + "/chat", json={}).status_code == 401
    assert httpx.get(auth_gateway.url + "/docs/assets/../../chat").status_code in (401, 404)
    assert httpx.get(auth_gateway.url + "/docs/assets/index.html").status_code == 401


def test_docs_examples_match_the_real_answers(gateway: ServerProcess, clean_sim: Sim) -> None:
    """The documented /chat answer has the keys the endpoint really returns."""
    schema = httpx.get(gateway.url + "/openapi.json").json()
    example = schema["paths"]["/chat"]["post"]["requestBody"]["content"]["application/json"]
    body = example["examples"]["chat"]["value"]
    real = httpx.post(gateway.url + "/chat", json=body, timeout=30).json()
    documented = schema["paths"]["/chat"]["post"]["responses"]["200"]["content"]
    assert set(real) == set(documented["application/json"]["example"])
    assert set(real["usage"]) == set(schema["components"]["schemas"]["Usage"]["required"])


@pytest.fixture(scope="module")
def mounted(sim: Sim) -> Iterator[ServerProcess]:
    port = free_port()
    args = [
        "-m",
        "uvicorn",
        "examples.mount_starlette:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**GATEWAY_ENV, "VLLM_BASE_URL": sim.base_url, "VLLM_WRAPPER_API_KEY": KEY}
    with python_server(args, port=port, env=env, health_path="/llm/health", name="host") as s:
        yield s


def test_docs_under_a_prefix(mounted: ServerProcess, clean_sim: Sim) -> None:
    schema = check_docs(mounted.url, "/llm")
    assert schema["servers"][0]["url"] == "/llm"
    # The schema's server + path is where the endpoint really is.
    r = httpx.post(
        mounted.url + schema["servers"][0]["url"] + "/chat",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(mounted.url + "/hello").json() == {"app": "host"}


def test_docs_can_be_switched_off(sim: Sim) -> None:
    port = free_port()
    env = {
        **GATEWAY_ENV,
        "VLLM_BASE_URL": sim.base_url,
        "VLLM_WRAPPER_API_KEY": "",
        "VLLM_WRAPPER_DOCS": "false",
    }
    args = ["-m", "proxy", "--host", "127.0.0.1", "--port", str(port), "--env-file", ""]
    with python_server(args, port=port, env=env, name="nodocs") as gw:
        assert httpx.get(gw.url + "/docs").status_code == 404
        assert httpx.get(gw.url + "/openapi.json").status_code == 404
