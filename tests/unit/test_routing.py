"""Balancing policies, the endpoint health state machine and the vLLM gauge reader."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from proxy.config import Settings
from proxy.configfile import RoutingSpec, UpstreamSpec
from proxy.routing.endpoint import Endpoint, Load
from proxy.routing.policies import LeastBusy, LoadAware, RoundRobin, Session, rendezvous_score
from proxy.routing.router import Router
from proxy.routing.vllmmetrics import read_gauges
from proxy.upstream import Upstream

RULES = RoutingSpec(eject_after=3, eject_backoff=1.0, eject_backoff_max=4.0)


def endpoint(n: int, weight: int = 1, rules: RoutingSpec = RULES) -> Endpoint:
    url = f"http://127.0.0.1:{9000 + n}/v1"
    return Endpoint(Upstream(Settings(), url=url), UpstreamSpec(url=url, weight=weight), rules)


def test_least_busy_prefers_fewer_in_flight() -> None:
    a, b = endpoint(1), endpoint(2)
    a.in_flight = 5
    pick = LeastBusy(random.Random(1))
    assert all(pick([a, b], None, 0.0) is b for _ in range(50))


def test_least_busy_respects_weights_when_idle() -> None:
    a, b = endpoint(1, weight=1), endpoint(2, weight=3)
    pick = LeastBusy(random.Random(7))
    counts = Counter(pick([a, b], None, 0.0).url for _ in range(4000))
    assert 0.70 < counts[b.url] / 4000 < 0.80


def test_least_busy_divides_in_flight_by_weight() -> None:
    a, b = endpoint(1, weight=1), endpoint(2, weight=4)
    a.in_flight, b.in_flight = 1, 3  # 1/1 > 3/4: b is less busy per unit of weight
    pick = LeastBusy(random.Random(3))
    assert all(pick([a, b], None, 0.0) is b for _ in range(50))


def test_smooth_weighted_round_robin_sequence() -> None:
    a, b, c = endpoint(1, 5), endpoint(2, 1), endpoint(3, 1)
    pick = RoundRobin()
    seq = "".join("abc"[[a, b, c].index(pick([a, b, c], None, 0.0))] for _ in range(7))
    assert seq == "aabacaa"  # nginx's smooth weighted round robin for 5:1:1


def test_session_is_sticky_and_returns_after_recovery() -> None:
    eps = [endpoint(i) for i in range(4)]
    pick = Session(LeastBusy(random.Random(0)))
    home = pick(eps, "session-42", 0.0)
    assert all(pick(eps, "session-42", 0.0) is home for _ in range(20))
    others = [e for e in eps if e is not home]
    moved = pick(others, "session-42", 0.0)
    assert moved is not home
    assert pick(eps, "session-42", 0.0) is home  # back once it is available again


def test_session_keys_spread_and_respect_weight() -> None:
    eps = [endpoint(1, 1), endpoint(2, 1), endpoint(3, 2)]
    pick = Session(LeastBusy(random.Random(0)))
    counts = Counter(pick(eps, f"user-{i}", 0.0).url for i in range(4000))
    assert 0.43 < counts[eps[2].url] / 4000 < 0.57
    assert rendezvous_score("k", "u", 2) > rendezvous_score("k", "u", 1)


def test_load_aware_avoids_the_queue_and_falls_back_when_stale() -> None:
    a, b, c = endpoint(1), endpoint(2), endpoint(3)
    now = 100.0
    a.load = Load(waiting=20, running=4, kv_cache=0.9, at=now)
    b.load = Load(waiting=0, running=4, kv_cache=0.5, at=now)
    c.load = Load(waiting=0, running=4, kv_cache=0.5, at=now)
    pick = LoadAware(LeastBusy(random.Random(5)), stale=2.0)
    assert all(pick([a, b, c], None, now + 1) is not a for _ in range(100))
    # Stale figures: least-busy on our own counts, where a is the idle one.
    b.in_flight = c.in_flight = 3
    picks = Counter(pick([a, b, c], None, now + 3).url for _ in range(300))
    assert picks[a.url] > 150  # chosen whenever drawn (2 of 3 pairs hold it)


def test_ejection_after_consecutive_failures_then_trial_and_growing_backoff() -> None:
    e = endpoint(1)
    e.failed("x")
    e.succeeded()
    e.failed("x")
    e.failed("x")
    assert e.healthy  # not consecutive: the success reset the count
    e.failed("boom")
    assert not e.healthy and e.last_error == "boom"
    now = time.monotonic()
    assert not e.available(now)
    assert e.available(e.down_until)
    e.trial = True  # one trial at a time
    assert not e.available(e.down_until)
    e.failed("again")  # the trial failed: out for twice as long
    assert not e.healthy and e.down_until - time.monotonic() > 1.5
    e.succeeded()
    assert e.healthy and e.backoff == RULES.eject_backoff


def test_router_never_leaves_nothing_to_try() -> None:
    settings = Settings()
    specs = [UpstreamSpec(url=f"http://127.0.0.1:{9100 + i}/v1") for i in range(3)]
    router = Router(settings, specs, RULES)
    for i, e in enumerate(router.endpoints):
        for _ in range(3):
            e.failed("down")
        e.last_failure = 10.0 + i
    picked = router.pick(router.all, None, [])
    assert picked is router.endpoints[0]  # the least recently failed


def test_router_fails_over_to_an_untried_endpoint() -> None:
    specs = [UpstreamSpec(url=f"http://127.0.0.1:{9200 + i}/v1") for i in range(3)]
    router = Router(Settings(), specs, RULES)
    tried: list[Endpoint] = []
    for _ in range(3):
        tried.append(router.pick(router.all, None, tried))
    assert len(set(map(id, tried))) == 3


def test_router_routes_by_model_and_refuses_unknown() -> None:
    specs = [
        UpstreamSpec(url="http://127.0.0.1:9301/v1", models=("big",)),
        UpstreamSpec(url="http://127.0.0.1:9302/v1", models=("small", "big")),
    ]
    router = Router(Settings(model="big"), specs, RULES)
    assert router.route_by_model
    assert [e.url for e in router.candidates("small")] == ["http://127.0.0.1:9302/v1"]
    assert len(router.candidates("big")) == 2
    assert len(router.candidates(None)) == 2  # no model: those serving VLLM_MODEL
    from proxy.errors import ModelNotFound

    with pytest.raises(ModelNotFound):
        router.candidates("huge")


def test_one_upstream_reads_no_body() -> None:
    router = Router(Settings(), [UpstreamSpec(url="http://127.0.0.1:9400/v1")], RULES)
    assert router.single and not router.route_by_model


METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 9.0
"""


def test_read_gauges_sums_engines() -> None:
    assert read_gauges(METRICS) == {"waiting": 9.0, "running": 4.0, "kv_cache": 0.375}
    assert read_gauges(b"# nothing of vLLM here\nup 1\n") is None


def test_reload_checks_first_then_switches_keeping_what_stays() -> None:
    from proxy.config import ConfigError
    from proxy.configfile import FileConfig

    settings = Settings(api_key="sk-global")
    a, b, c = (f"http://127.0.0.1:{9500 + i}/v1" for i in range(3))
    router = Router(settings, [UpstreamSpec(url=a), UpstreamSpec(url=b)], RULES)
    kept = router.endpoints[0]
    kept.in_flight = 2
    # Credentials in a URL plus the global VLLM_API_KEY: refused, nothing changes.
    bad = FileConfig(path="gw.toml", upstreams=(UpstreamSpec(url="http://u:p@127.0.0.1:1/v1"),))
    with pytest.raises(ConfigError, match="Authorization"):
        router.prepare(bad)
    assert [e.url for e in router.endpoints] == [a, b] and router.version == 0

    from proxy.accesslog import RequestInfo

    dispatch = router.dispatch(None, None, RequestInfo(b"id"))
    new = FileConfig(
        path="gw.toml",
        upstreams=(UpstreamSpec(url=a, weight=5), UpstreamSpec(url=c)),
        routing=RoutingSpec(policy="round-robin"),
    )
    removed = router.endpoints[1]
    asyncio.run(router.prepare(new)())
    assert [e.url for e in router.endpoints] == [a, c]
    assert router.endpoints[0] is kept and kept.weight == 5 and kept.in_flight == 2
    assert removed.retired and not removed.available(time.monotonic())
    assert router.rules.policy == "round-robin" and router.version == 1
    # A request that began before the reload refreshes its candidates on its next attempt.
    assert dispatch.version != router.version and removed in dispatch.candidates
    for _ in range(5):
        assert router.pick(router.all, None, []) is not removed
