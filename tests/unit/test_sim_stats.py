from __future__ import annotations

from proxy.sim.stats import Stats


def test_the_gateways_own_probes_are_counted_but_not_the_last_request() -> None:
    stats = Stats()
    body = b'{"model":"m","prompt":"hi"}'
    stats.received("/v1/completions", "POST", [(b"user-agent", b"OpenAI/Python 1.0")], body)
    own = [(b"user-agent", b"vllm-wrapper/1.2.3"), (b"x-request-id", b"probe-1")]
    stats.received("/v1/models", "GET", own, b"")
    snap = stats.snapshot()
    assert snap["requests"] == 2
    assert snap["by_path"] == {"/v1/completions": 1, "/v1/models": 1}
    assert snap["last_request"]["path"] == "/v1/completions"
    assert "probe-1" in stats.request_ids


def test_any_other_client_becomes_the_last_request() -> None:
    stats = Stats()
    stats.received("/v1/completions", "POST", [], b"{}")
    stats.received("/v1/models", "GET", [(b"user-agent", b"curl/8.0 vllm-wrapper/1")], b"")
    assert stats.snapshot()["last_request"]["path"] == "/v1/models"
