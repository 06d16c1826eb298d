"""Metrics without sockets: route templates, label bounds, the stage reports, settings, files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.accesslog import RequestInfo
from proxy.config import Settings
from proxy.configfile import ConfigFileError, MetricsSpec, load
from proxy.metrics import (
    Metrics,
    NoMetrics,
    prepare_multiproc_dir,
    reap_dead_processes,
    resolve,
    route_of,
)
from tests.support.metrics import Scrape


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions/", "/v1/chat/completions"),
        ("/v1/completions", "/v1/completions"),
        ("/v1/embeddings", "/v1/embeddings"),
        ("/v1/models", "/v1/models"),
        ("/v1/models/meta-llama/Llama-3.1-8B", "/v1/*"),
        ("/v1/responses/resp_123/cancel", "/v1/*"),
        ("/v1/x9f8a7", "/v1/*"),
        ("/v1", "/v1"),
        ("/chat", "/chat"),
        ("/chat/", "/chat"),
        ("/health", "/health"),
        ("/metrics", "/metrics"),
        ("/docs/assets/swagger-ui.css", "/docs"),
        ("/conversations/c_1", "/conversations"),
        ("/admin/reload", "/admin"),
        ("/", "/"),
        ("/wp-login.php", "other"),
        ("/v1x", "other"),
        ("//", "/"),
    ],
)
def test_route_templates(path: str, route: str) -> None:
    assert route_of(path) == route


def _request(model: str | None = None, key: str | None = None, body: bytes = b"") -> RequestInfo:
    info = RequestInfo(b"rid")
    info.model = model
    info.key_name = key
    info.body = body
    return info


def _observe(
    m: Metrics,
    info: RequestInfo,
    method: str = "POST",
    *,
    status: int = 200,
    headers_at: float | None = 0.1,
    first_byte_at: float | None = 0.2,
    complete: bool = True,
    stream: bool = False,
) -> None:
    """What the access log records as the response goes out (times after arrival)."""
    t = info.started
    info.status = status
    info.headers_at = None if headers_at is None else t + headers_at
    info.first_byte_at = None if first_byte_at is None else t + first_byte_at
    info.complete = complete
    ctype = b"text/event-stream" if stream else b"application/json"
    info.response_headers = [(b"content-type", ctype)] if status else []
    m.observe(info, "/v1/chat/completions", method, t + 0.5)


def _scrape(m: Metrics) -> Scrape:
    body, content_type = m.scrape()
    assert content_type.startswith("text/plain")
    return Scrape(body.decode())


def test_model_key_and_method_labels_are_bounded() -> None:
    m = Metrics({"llama", "tiny"}, keys={"team-a"})
    _observe(m, _request("llama", "team-a"))
    _observe(m, _request("made-up-model", "team-b"), method="BREW")
    _observe(m, _request(None, None), method="GET")
    _observe(m, _request(None, "invalid", body=b'{"model": "tiny", "messages": []}'))
    s = _scrape(m)
    req = "vllm_wrapper_requests_total"
    base = {"route": "/v1/chat/completions", "status": "200"}
    assert s.value(req, **base, method="POST", model="llama", key="team-a") == 1
    assert s.value(req, **base, method="other", model="other", key="other") == 1
    assert s.value(req, **base, method="GET", model="none", key="anonymous") == 1
    # no stage named the model: it is read from the request body (once)
    assert s.value(req, **base, method="POST", model="tiny", key="invalid") == 1


def test_timings_and_stream_outcomes() -> None:
    m = Metrics({"llama"})
    info = _request("llama")
    info.upstream_ms = 60.0
    _observe(m, info, stream=True)
    left = _request("llama")
    left.disconnected_at = left.started + 0.3
    _observe(m, left, stream=True, complete=False)
    cut = _request("llama")
    _observe(m, cut, stream=True, complete=False)
    nothing_sent = _request("llama")
    nothing_sent.disconnected_at = nothing_sent.started + 0.05
    _observe(m, nothing_sent, status=0, headers_at=None, first_byte_at=None, complete=False)
    s = _scrape(m)
    route = "/v1/chat/completions"
    streams = "vllm_wrapper_streams_total"
    assert s.value(streams, route=route, model="llama", outcome="completed") == 1
    assert s.value(streams, route=route, model="llama", outcome="client_disconnected") == 1
    assert s.value(streams, route=route, model="llama", outcome="upstream_cut") == 1
    # the client that left before any status: 499
    req = "vllm_wrapper_requests_total"
    assert s.value(req, route=route, method="POST", status="499", model="llama", key="anonymous")
    assert s.value("vllm_wrapper_client_disconnects_total", route=route) == 2
    # abort latency: 0.5 - 0.3 and 0.5 - 0.05
    assert s.value("vllm_wrapper_abort_latency_seconds_sum", route=route) == pytest.approx(0.65)
    # overhead: headers at 0.1 s, of which 0.06 s upstream
    assert s.value("vllm_wrapper_overhead_seconds_count", route=route) == 1
    assert s.value("vllm_wrapper_overhead_seconds_sum", route=route) == pytest.approx(0.04)
    assert s.value("vllm_wrapper_time_to_first_byte_seconds_count", route=route, model="llama") == 3
    assert s.value("vllm_wrapper_request_duration_seconds_sum", route=route, model="llama") == (
        pytest.approx(2.0)
    )


def test_tokens_from_usage() -> None:
    m = Metrics({"llama"})
    info = _request("llama", "team-a")
    info.set_usage({"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42})
    _observe(m, info)
    bad = _request("llama", "team-a")
    bad.set_usage({"prompt_tokens": "many", "completion_tokens": -3})
    _observe(m, bad)
    s = _scrape(m)
    tokens = "vllm_wrapper_tokens_total"
    assert s.value(tokens, model="llama", key="team-a", kind="prompt") == 12
    assert s.value(tokens, model="llama", key="team-a", kind="completion") == 30


def test_stage_reports_are_one_call_each() -> None:
    m = Metrics({"llama"}, keys={"team-a"})
    m.rate_limited("team-a", "rpm")
    m.rate_limited("team-a", "rpm")
    m.upstream_request("http://a:8000/v1", "2xx")
    m.upstream_request("http://a:8000/v1", "timeout")
    m.upstream_health("http://a:8000/v1", False)
    m.cache("hit")
    m.cache("miss")
    m.cache("strange")
    s = _scrape(m)
    assert s.value("vllm_wrapper_rate_limited_total", key="team-a", limit="rpm") == 2
    up = "vllm_wrapper_upstream_requests_total"
    assert s.value(up, upstream="http://a:8000/v1", outcome="timeout") == 1
    assert s.value("vllm_wrapper_upstream_healthy", upstream="http://a:8000/v1") == 0
    assert s.value("vllm_wrapper_cache_requests_total", result="hit") == 1
    assert s.value("vllm_wrapper_cache_requests_total", result="other") == 1
    assert s.families["process_cpu_seconds"] == "counter"
    # metrics off: the same calls exist and do nothing
    off = NoMetrics()
    off.rate_limited("k", "rpm")
    off.upstream_request("u", "2xx")
    off.upstream_health("u", True)
    off.cache("hit")
    assert not off.enabled


def test_two_apps_in_one_process_keep_their_own_figures() -> None:
    a, b = Metrics({"x"}), Metrics({"x"})
    a.cache("hit")
    assert _scrape(a).value("vllm_wrapper_cache_requests_total", result="hit") == 1
    assert _scrape(b).value("vllm_wrapper_cache_requests_total", result="hit") == 0


@pytest.mark.parametrize(
    ("env", "spec", "expected"),
    [
        ({}, None, (True, False)),
        ({}, MetricsSpec(enabled=False, public=True), (False, True)),
        ({"VLLM_WRAPPER_METRICS": "true"}, MetricsSpec(enabled=False), (True, False)),
        ({"VLLM_WRAPPER_METRICS_PUBLIC": "false"}, MetricsSpec(public=True), (True, False)),
        ({"VLLM_WRAPPER_METRICS": "off", "VLLM_WRAPPER_METRICS_PUBLIC": "1"}, None, (False, True)),
    ],
)
def test_environment_wins_over_the_file(
    env: dict[str, str], spec: MetricsSpec | None, expected: tuple[bool, bool]
) -> None:
    assert resolve(Settings.from_mapping(env), spec) == expected


def test_metrics_section_of_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[metrics]\npublic = true\n")
    assert load(path, environ={}).metrics == MetricsSpec(enabled=None, public=True)
    path.write_text('[metrics]\npublic = "yes"\n')
    with pytest.raises(
        ConfigFileError, match=r'metrics\.public: expected true or false, got "yes"'
    ):
        load(path, environ={})
    path.write_text("[metrics]\npubic = true\n")
    with pytest.raises(ConfigFileError, match=r"metrics\.pubic: unknown key"):
        load(path, environ={})


def test_multiprocess_directory_files(tmp_path: Path) -> None:
    (tmp_path / "counter_1.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("kept")
    prepare_multiproc_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    me = os.getpid()
    for name in (
        f"gauge_livesum_{dead_pid}.db",
        f"gauge_livesum_{me}.db",
        f"counter_{dead_pid}.db",
    ):
        (tmp_path / name).write_bytes(b"")
    assert reap_dead_processes(str(tmp_path)) == [dead_pid]
    left = sorted(p.name for p in tmp_path.glob("*.db"))
    # the dead process's counts stay; its live gauge is gone; a live one's stays
    assert left == sorted([f"counter_{dead_pid}.db", f"gauge_livesum_{me}.db"])
