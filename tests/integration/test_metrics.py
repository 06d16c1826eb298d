"""``GET /metrics``: exact figures after known traffic, bounded labels, auth, workers, dashboard."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import string
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, KEY, MODEL, Sim
from tests.support.metrics import Scrape, scrape, wait_scrape
from tests.support.procfs import children
from tests.support.servers import ROOT, ServerProcess, gateway_server

AUTH = {"authorization": f"Bearer {KEY}"}
ROUTE = "/v1/chat/completions"
DASHBOARD = ROOT / "grafana" / "vllm-wrapper.json"


@pytest.fixture(scope="module")
def gw(sim: Sim) -> Iterator[ServerProcess]:
    """A gateway with auth and metrics on (the default), its own counts."""
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_API_KEY": KEY}
    with gateway_server(sim.base_url, env=env) as server:
        yield server


def _chat(client: httpx.Client, url: str, **extra: object) -> httpx.Response:
    headers = {**AUTH, **extra.pop("headers", {})}  # type: ignore[dict-item]
    return client.post(url + ROUTE, json={**CHAT_BODY, **extra}, headers=headers)


def test_known_traffic_gives_exact_counts(gw: ServerProcess, sim: Sim) -> None:
    before = scrape(gw.url, AUTH)
    url = gw.url
    with httpx.Client(timeout=30) as client:
        # 3 whole answers, 2 streams, to a model the upstream lists (not VLLM_MODEL)
        for _ in range(3):
            assert _chat(client, url, model="tiny-llama").status_code == 200
        for _ in range(2):
            r = _chat(client, url, model="tiny-llama", stream=True)
            assert r.text.endswith("data: [DONE]\n\n")
        # errors: a wrong key, an unknown path, an upstream 500 (not retried), a model
        # nobody serves (vLLM's 404)
        assert client.post(url + ROUTE, json=CHAT_BODY).status_code == 401
        assert client.get(url + "/v1/nope", headers=AUTH).status_code == 404
        r = _chat(client, url, headers={"x-sim-fail-status": "500"})
        assert r.status_code == 500
        assert _chat(client, url, model="no-such-model-xyz").status_code == 404
        # /chat, whole and streamed: tokens from the answers' usage
        r = client.post(url + "/chat", json={"messages": CHAT_BODY["messages"]}, headers=AUTH)
        assert r.status_code == 200
        usage = r.json()["usage"]
        with client.stream(
            "POST", url + "/chat", json={**CHAT_BODY, "stream": True}, headers=AUTH
        ) as r:
            text = r.read().decode()
        stream_usage = json.loads(text.split("event: usage\ndata:")[1].split("\n")[0])
        # an upstream that cuts a /v1 stream and a /chat stream after a few chunks
        with client.stream(
            "POST",
            url + ROUTE,
            json={**CHAT_BODY, "stream": True, "max_tokens": 50},
            headers={**AUTH, "x-sim-drop-after": "3"},
        ) as r:
            with pytest.raises(httpx.RemoteProtocolError):
                r.read()
        sim.faults(drop_after_chunks=3, count=1)  # /chat sends no x-sim-* headers upstream
        with client.stream(
            "POST",
            url + "/chat",
            json={**CHAT_BODY, "stream": True, "max_tokens": 50},
            headers=AUTH,
        ) as r:
            assert b"event: error" in r.read()
        # a client that leaves mid-stream
        with client.stream(
            "POST",
            url + ROUTE,
            json={**CHAT_BODY, "stream": True, "max_tokens": 200},
            headers={**AUTH, "x-sim-token-delay": "0.05"},
        ) as r:
            chunks = r.iter_raw()
            next(chunks)
            next(chunks)

    def disconnect_seen(s: Scrape) -> bool:
        return s.value("vllm_wrapper_client_disconnects_total", route=ROUTE) > before.value(
            "vllm_wrapper_client_disconnects_total", route=ROUTE
        )

    after = wait_scrape(gw.url, disconnect_seen, AUTH)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    req = "vllm_wrapper_requests_total"
    ok = {"route": ROUTE, "method": "POST", "status": "200", "key": "env-1"}
    # 3 whole + 2 streams
    assert delta(req, **ok, model="tiny-llama") == 5
    # the cut stream and the one whose client left (their 200 was sent) were for MODEL
    assert delta(req, **ok, model=MODEL) == 2
    assert delta(req, route=ROUTE, method="POST", status="401", model="none", key="invalid") == 1
    assert delta(req, route="/v1/*", method="GET", status="404", model="none", key="env-1") == 1
    assert delta(req, route=ROUTE, method="POST", status="500", model=MODEL, key="env-1") == 1
    assert delta(req, route=ROUTE, method="POST", status="404", model="other", key="env-1") == 1
    chat = {"route": "/chat", "method": "POST", "status": "200", "model": MODEL, "key": "env-1"}
    assert delta(req, **chat) == 3

    # histograms count the same requests
    dur = "vllm_wrapper_request_duration_seconds_count"
    assert delta(dur, route=ROUTE, model="tiny-llama") == 5
    assert delta(dur, route=ROUTE, model=MODEL) == 3  # cut, left, 500 (the 401: "none")
    assert delta(dur, route="/chat", model=MODEL) == 3
    ttfb = "vllm_wrapper_time_to_first_byte_seconds_count"
    assert delta(ttfb, route=ROUTE, model="tiny-llama") == 5
    # overhead: every /v1/chat/completions request that reached the upstream stage
    # (5 tiny-llama, the cut one, the one left, the 500, the 404): not the 401 nor /v1/nope
    assert delta("vllm_wrapper_overhead_seconds_count", route=ROUTE) == 9
    for name in (dur, ttfb, "vllm_wrapper_overhead_seconds_count"):
        assert after.value(
            name.replace("_count", "_bucket"),
            route=ROUTE,
            le="+Inf",
            **({} if "overhead" in name else {"model": "tiny-llama"}),
        ) == after.value(
            name, route=ROUTE, **({} if "overhead" in name else {"model": "tiny-llama"})
        )

    streams = "vllm_wrapper_streams_total"
    assert delta(streams, route=ROUTE, model="tiny-llama", outcome="completed") == 2
    assert delta(streams, route=ROUTE, model=MODEL, outcome="client_disconnected") == 1
    assert delta(streams, route=ROUTE, model=MODEL, outcome="upstream_cut") == 1
    assert delta(streams, route="/chat", model=MODEL, outcome="completed") == 1
    assert delta(streams, route="/chat", model=MODEL, outcome="upstream_cut") == 1
    assert delta("vllm_wrapper_client_disconnects_total", route=ROUTE) == 1
    assert delta("vllm_wrapper_abort_latency_seconds_count", route=ROUTE) == 1

    up = "vllm_wrapper_upstream_requests_total"
    upstream = sim.base_url
    # 2xx: 5 tiny-llama, the cut /v1 stream, the one left, /chat x2, the cut /chat stream
    assert delta(up, upstream=upstream, outcome="2xx") == 10
    assert delta(up, upstream=upstream, outcome="5xx") == 1
    assert delta(up, upstream=upstream, outcome="4xx") == 1
    assert after.value("vllm_wrapper_upstream_healthy", upstream=upstream) == 1

    tokens = "vllm_wrapper_tokens_total"
    prompt = usage["prompt_tokens"] + stream_usage["prompt_tokens"]
    completion = usage["completion_tokens"] + stream_usage["completion_tokens"]
    assert delta(tokens, model=MODEL, key="env-1", kind="prompt") == prompt
    assert delta(tokens, model=MODEL, key="env-1", kind="completion") == completion
    # nothing in flight but the scrape itself
    assert after.total("vllm_wrapper_inflight_requests") == 1


def test_access_log_names_key_and_model(gw: ServerProcess) -> None:
    rid = "metrics-log-check-1"
    with httpx.Client(timeout=30) as client:
        r = client.post(
            gw.url + ROUTE,
            json={**CHAT_BODY, "model": "tiny-llama"},
            headers={**AUTH, "x-request-id": rid},
        )
        assert r.status_code == 200
    deadline = time.monotonic() + 10
    line = ""
    while time.monotonic() < deadline and not line:
        line = next((ln for ln in gw.log_text().splitlines() if rid in ln), "")
        time.sleep(0.05)
    assert " key=env-1 model=tiny-llama " in line, line
    assert KEY not in gw.log_text()


def test_labels_stay_bounded_whatever_clients_send(gw: ServerProcess) -> None:
    rng = random.Random(14)

    def word(n: int = 12) -> str:
        return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(n))

    async def flood(n: int) -> None:
        sem = asyncio.Semaphore(16)
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "FOO", "PROPFIND"]
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:

            async def one(i: int) -> None:
                async with sem:
                    kind = i % 4
                    if kind == 0:  # a random model, to the upstream (vLLM's 404)
                        body = {**CHAT_BODY, "model": word()}
                        await client.post(ROUTE, json=body, headers=AUTH)
                    elif kind == 1:  # a random path under /v1
                        await client.request(rng.choice(methods), f"/v1/{word()}/{word(4)}")
                    elif kind == 2:  # a random path of the gateway, random key
                        h = {"authorization": f"Bearer {word()}"}
                        await client.request(rng.choice(methods), f"/{word()}", headers=h)
                    else:  # a random model to /chat
                        body = {"messages": CHAT_BODY["messages"], "model": word(40)}
                        await client.post("/chat", json=body, headers=AUTH)

            await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(flood(400))
    first = scrape(gw.url, AUTH)
    asyncio.run(flood(2000))
    second = scrape(gw.url, AUTH)
    # 2000 more random models, paths, methods and keys added no series at all
    assert second.series() == first.series()
    req = "vllm_wrapper_requests_total"
    assert second.label_values(req, "model") <= {MODEL, "tiny-llama", "other", "none"}
    assert second.label_values(req, "key") <= {"env-1", "invalid", "anonymous"}
    assert second.label_values(req, "method") <= {
        "GET",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "HEAD",
        "OPTIONS",
        "other",
    }
    routes = second.label_values(req, "route")
    assert routes <= {ROUTE, "/v1/*", "/chat", "/metrics", "/health", "other"}, routes
    # 2400 distinct random values would have made at least as many series had any leaked
    assert len(second.series()) < 1000


def test_metrics_auth_and_openmetrics(gw: ServerProcess) -> None:
    r = httpx.get(gw.url + "/metrics", timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(gw.url + "/metrics", headers={"authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 401
    r = httpx.post(gw.url + "/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 405
    # Prometheus asks for OpenMetrics; the answer parses as such
    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    r = httpx.get(gw.url + "/metrics", headers={**AUTH, "accept": accept}, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    names = {f.name for f in openmetrics_families(r.text)}
    assert "vllm_wrapper_requests" in names


def test_public_metrics_and_metrics_off(sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_API_KEY": KEY, "VLLM_WRAPPER_METRICS_PUBLIC": "true"}
    with gateway_server(sim.base_url, env=env) as server:
        s = scrape(server.url)  # no key needed
        assert s.declares("vllm_wrapper_requests_total")
        # the rest still needs the key
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    with gateway_server(
        sim.base_url, env={**GATEWAY_ENV, "VLLM_WRAPPER_METRICS": "false"}
    ) as server:
        r = httpx.get(server.url + "/metrics", timeout=10)
        assert r.status_code == 404
        r = httpx.post(server.url + ROUTE, json=CHAT_BODY, timeout=30)
        assert r.status_code == 200


def test_bad_metrics_setting_stops_startup(sim: Sim) -> None:
    server = gateway_server(
        sim.base_url, env={**GATEWAY_ENV, "VLLM_WRAPPER_METRICS": "maybe"}, startup_timeout=15
    )
    with pytest.raises(RuntimeError) as err:
        server.start()
    assert "VLLM_WRAPPER_METRICS='maybe': expected true or false" in str(err.value)


def _worker_pids(server: ServerProcess) -> list[int]:
    assert server.proc is not None
    return children(server.proc.pid)


def test_workers_share_their_figures(sim: Sim, tmp_path: Path) -> None:
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    (mp_dir / "counter_99999.db").write_bytes(b"left over from an earlier run")
    env = {**GATEWAY_ENV, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    with gateway_server(sim.base_url, "--workers", "2", env=env) as server:
        deadline = time.monotonic() + 30
        while len(_worker_pids(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (mp_dir / "counter_99999.db").exists()
        n = 40
        for _ in range(n):  # a new connection each: the kernel spreads them over the workers
            r = httpx.post(server.url + ROUTE, json={**CHAT_BODY, "model": "tiny-llama"})
            assert r.status_code == 200
        req = "vllm_wrapper_requests_total"
        labels = {"route": ROUTE, "method": "POST", "status": "200", "model": "tiny-llama"}
        # whichever worker answers the scrape, the totals are all workers'
        for _ in range(6):
            s = scrape(server.url)
            assert s.value(req, **labels, key="anonymous") == n
            assert (
                s.value(
                    "vllm_wrapper_request_duration_seconds_count", route=ROUTE, model="tiny-llama"
                )
                == n
            )
        written = {p.name.rsplit("_", 1)[1] for p in mp_dir.glob("counter_*.db")}
        assert len(written) == 2, written  # both workers served some

        # a worker that dies: uvicorn starts another; its in-flight gauge file is dropped
        # at the next scrape, its counts stay in the totals
        victim = _worker_pids(server)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = _worker_pids(server)
            if victim not in pids and len(pids) == 2:
                break
            time.sleep(0.1)
        s = wait_scrape(server.url, lambda s: not list(mp_dir.glob(f"gauge_live*_{victim}.db")))
        assert not list(mp_dir.glob(f"gauge_live*_{victim}.db"))
        assert s.value(req, **labels, key="anonymous") == n
        assert s.total("vllm_wrapper_inflight_requests") == 1  # the scrape itself
    # the directory is left (it was named), emptied at the next start


def test_dashboard_queries_use_live_metric_names(gw: ServerProcess) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []) if "expr" in t
    ]
    assert len(exprs) >= 10
    with httpx.Client(timeout=30) as client:
        assert _chat(client, gw.url, model="tiny-llama").status_code == 200
    live = scrape(gw.url, AUTH)
    names = {n for e in exprs for n in re.findall(r"\bvllm_wrapper_[a-z_]+", e)}
    missing = sorted(n for n in names if not live.declares(n))
    assert not missing, missing
    # every §9 metric has a panel
    for family in (
        "requests",
        "request_duration_seconds",
        "time_to_first_byte_seconds",
        "overhead_seconds",
        "inflight_requests",
        "upstream_requests",
        "upstream_healthy",
        "tokens",
        "rate_limited",
        "client_disconnects",
        "cache_requests",
    ):
        assert any(n.startswith("vllm_wrapper_" + family) for n in names), family
