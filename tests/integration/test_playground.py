"""``GET /playground``: served offline by the gateway, and driven in a real headless Chromium.

The browser test is marked ``browser`` (deselected by default; ``pytest -m browser``, which
``.ci/run`` runs after installing Debian's ``chromium``). It skips, loudly, only when no
Chromium or no Playwright can be found.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.integration.conftest import GATEWAY_ENV, KEY, MODEL, Sim
from tests.support.servers import (
    ServerProcess,
    free_port,
    gateway_server,
    python_server,
    sim_server,
)
from tests.support.wsclient import chat_socket, collect, send


def test_page_and_assets_are_served_without_a_key_and_fetch_nothing_outside(
    auth_gateway: ServerProcess,
) -> None:
    page = httpx.get(auth_gateway.url + "/playground", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/playground/playground.js" in assets and "/playground/playground.css" in assets
    for url in assets:
        assert url.startswith("/"), url  # nothing from a CDN
        if url.startswith("/playground/"):
            r = httpx.get(auth_gateway.url + url, timeout=10)
            assert r.status_code == 200 and r.content, url
            assert b"http://" not in r.content and b"https://" not in r.content, url
    # The page needs no key; the API still does.
    assert httpx.get(auth_gateway.url + "/models", timeout=10).status_code == 401
    assert httpx.get(auth_gateway.url + "/playground/nope.js", timeout=10).status_code == 401


def test_off_means_gone(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_PLAYGROUND": "false"}
    with gateway_server(sim.base_url, env=env) as gw:
        assert httpx.get(gw.url + "/playground", timeout=10).status_code == 404


# ---- in a real browser ---------------------------------------------------------------------

CHROMIUM = os.environ.get("VLLM_WRAPPER_TEST_CHROMIUM") or shutil.which("chromium") or ""


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[Sim]:
    """Exactly min(400, max_tokens) tokens, 30 ms apart: streaming a person can watch."""
    args = ("--model", f"{MODEL},tiny-llama", "--tokens", "400", "--token-delay", "0.03")
    with sim_server(*args) as server:
        yield Sim(server)


@pytest.fixture(scope="module")
def page_gateway(slow_sim: Sim) -> Iterator[ServerProcess]:
    with gateway_server(slow_sim.base_url, env={**GATEWAY_ENV, "VLLM_WRAPPER_API_KEY": KEY}) as s:
        yield s


@pytest.fixture
def browser_page(tmp_path: Path):  # type: ignore[no-untyped-def]
    if not CHROMIUM or not Path(CHROMIUM).exists():
        pytest.skip(
            "NO CHROMIUM FOUND: the playground browser test did not run. "
            "Install it with `apt-get install -y chromium` (or set VLLM_WRAPPER_TEST_CHROMIUM)."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("PLAYWRIGHT NOT INSTALLED: pip install -e '.[test]' installs it")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, chromium_sandbox=False, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
            assert not errors, errors
        finally:
            browser.close()


ANSWER = ".msg.assistant"


def _ask(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def _wait_chunks(page, answer: int, chunks: int, *, streaming: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Wait until answer number ``answer`` shows ``chunks`` pieces (still streaming, if asked)."""
    still = "b.classList.contains('streaming') &&" if streaming else ""
    page.wait_for_function(
        f"() => {{ const b = document.querySelectorAll('{ANSWER}')[{answer}];"
        f" return b && {still} Number(b.dataset.chunks) >= {chunks}; }}"
    )


@pytest.mark.browser
def test_chat_in_headless_chromium(
    browser_page, page_gateway: ServerProcess, slow_sim: Sim, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    page = browser_page
    slow_sim.reset()
    page.goto(page_gateway.url + "/playground")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'")
    assert "API key" in page.inner_text("#status")  # /models said 401: the page asks for it
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    options = "[...document.querySelectorAll('#model option')]"
    page.wait_for_function(f"{options}.some(o => o.value === {orjson.dumps(MODEL).decode()})")
    assert page.eval_on_selector("#model", "s => [...s.options].map(o => o.value)") == [
        MODEL,
        "tiny-llama",
    ]

    # 1. A short answer streams in pieces: text shows while the answer is still streaming.
    page.fill("#max-tokens", "40")
    _ask(page, "Hello! How are you?")
    first = page.locator(ANSWER).nth(0)
    _wait_chunks(page, 0, 3, streaming=True)
    partial = first.locator(".text").inner_text()
    first.and_(page.locator("[data-finish]")).wait_for(timeout=30_000)
    whole = first.locator(".text").inner_text()
    assert partial and whole.startswith(partial) and len(whole) > len(partial)
    assert first.get_attribute("data-finish") == "length"
    stats = first.locator(".stats").inner_text()
    assert "40 completion tokens" in stats and "first token" in stats, stats

    # 2. A long answer, stopped mid-way: the upstream sees the abort.
    page.fill("#max-tokens", "400")
    _ask(page, "Write a long story, please.")
    second = page.locator(ANSWER).nth(1)
    _wait_chunks(page, 1, 5)
    page.click("#stop")
    second.and_(page.locator("[data-finish]")).wait_for(timeout=30_000)
    assert second.get_attribute("data-finish") == "cancelled"
    assert "stopped" in second.locator(".stats").inner_text()
    stats = slow_sim.wait_aborted(1, timeout=10)
    assert stats["aborted"] == 1 and stats["open_streams"] == 0
    assert stats["generation_tokens"] < 400 + 40

    # 3. The conversation goes on: the next turn carries both earlier ones.
    page.fill("#max-tokens", "20")
    _ask(page, "And a short one?")
    third = page.locator(ANSWER).nth(2)
    third.and_(page.locator("[data-finish]")).wait_for(timeout=30_000)
    assert third.get_attribute("data-finish") == "length"
    sent = orjson.loads(slow_sim.stats()["last_request"]["body"])
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert sent["messages"][1]["content"] == whole
    assert sent["model"] == MODEL

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_demo_prints_the_playground_url_and_chats_over_the_socket() -> None:
    port = free_port()
    args = ["-m", "proxy", "--demo", "--host", "127.0.0.1", "--port", str(port), "--env-file", ""]
    with python_server(args, port=port, env={"VLLM_WRAPPER_API_KEY": ""}, name="demo") as demo:
        url = f"http://127.0.0.1:{port}/playground"
        assert f"chat in your browser at {url}" in demo.log_text()
        assert httpx.get(url, timeout=10).status_code == 200
        with chat_socket(demo.url) as ws:
            send(ws, type="chat", id=1, messages=[{"role": "user", "content": "hi"}])
            got = collect(ws, {1})[1]
        assert got[-1]["type"] == "done" and len(got) > 3


@pytest.mark.browser
def test_readme_browser_snippet_runs_as_written(
    browser_page, page_gateway: ServerProcess, slow_sim: Sim
) -> None:  # type: ignore[no-untyped-def]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```js\n(.*?)```", readme, re.S) if "/chat/ws" in b]
    page = browser_page
    page.goto(page_gateway.url + "/playground")  # any page of the gateway's origin
    with page.expect_console_message(lambda m: m.type == "log", timeout=30_000) as caught:
        page.add_script_tag(content=snippet)  # a classic script, as in a page
    done = caught.value.args[0].json_value()
    assert done["type"] == "done" and done["id"] == "t1", done
    assert done["usage"]["completion_tokens"] == 400  # the slow simulator's fixed length
    assert "You asked about" in page.inner_text("body")
