"""The response cache and Idempotency-Key (SPEC §12) through a real gateway process in
front of the simulator: hits are the miss's bytes and reach no upstream, privacy per
key, Cache-Control, what is never stored, and retries that never generate twice."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import GATEWAY_ENV, MODEL, Sim
from tests.support.procfs import rss_bytes
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess, gateway_server

A, B = "cache-team-a", "cache-team-b"

CONFIG = f"""
[[keys]]
name = "a"
key = "{A}"
admin = true

[[keys]]
name = "b"
key = "{B}"

[cache]
enabled = true

[state]
backend = "memory"
"""


def auth(key: str = A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(text: str | None = None, **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text or f"Say hello {uuid.uuid4().hex}"}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def start(sim: Sim, tmp_path: Path, config: str = CONFIG, **env: str) -> ServerProcess:
    """The gateway, not yet started: ``with start(...) as gw`` starts and stops it."""
    path = tmp_path / "gateway.toml"
    path.write_text(config)
    return gateway_server(sim.base_url, "--config", str(path), env={**GATEWAY_ENV, **env})


@pytest.fixture(scope="module")
def gw(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start(sim, tmp_path_factory.mktemp("cache")) as server:
        yield server


@pytest.fixture
def client(gw: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


def post(client: httpx.Client, path: str, body: dict, key: str = A, **headers: str):
    return client.post(path, json=body, headers={**auth(key), **headers})


def stream(client: httpx.Client, path: str, body: dict, key: str = A, **headers: str):
    """(response, raw body bytes) of a streamed request read to its end."""
    with client.stream("POST", path, json=body, headers={**auth(key), **headers}) as r:
        return r, b"".join(r.iter_raw())


def generations(sim: Sim) -> int:
    stats = sim.stats()
    return stats["completed"] + stats["aborted"]


# ---- the cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_hit_is_the_miss_bytes_and_reaches_no_upstream(clean_sim, client, path):
    body = chat() if "chat" in path else {"model": MODEL, "prompt": uuid.uuid4().hex, "seed": 7}
    first = post(client, path, body)
    assert first.status_code == 200
    assert first.headers["x-cache"] == "MISS"
    assert "age" not in first.headers
    seen = clean_sim.receipts(None)
    second = post(client, path, body)
    assert second.status_code == 200
    assert second.headers["x-cache"] == "HIT"
    assert int(second.headers["age"]) >= 0
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    assert clean_sim.receipts(None) == seen


def test_stream_hit_replays_the_same_sse_bytes(clean_sim, client):
    body = chat(stream=True)
    first, raw = stream(client, "/v1/chat/completions", body)
    assert first.headers["x-cache"] == "MISS"
    assert raw.endswith(b"data: [DONE]\n\n")
    seen = clean_sim.receipts(None)
    second, again = stream(client, "/v1/chat/completions", body)
    assert second.headers["x-cache"] == "HIT"
    assert second.headers["content-type"].startswith("text/event-stream")
    assert again == raw
    assert clean_sim.receipts(None) == seen


def test_embeddings_are_always_cached(clean_sim, client):
    body = {"model": MODEL, "input": f"cache me {uuid.uuid4().hex}"}
    first = post(client, "/v1/embeddings", body)
    second = post(client, "/v1/embeddings", body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert clean_sim.stats()["by_path"].get("/v1/embeddings", 0) == 1


def test_entries_are_private_to_the_key(clean_sim, client):
    body = chat()
    assert post(client, "/v1/chat/completions", body, A).headers["x-cache"] == "MISS"
    other = post(client, "/v1/chat/completions", body, B)
    assert other.headers["x-cache"] == "MISS"
    assert post(client, "/v1/chat/completions", body, B).headers["x-cache"] == "HIT"
    assert generations(clean_sim) == 2


@pytest.mark.parametrize(
    "body",
    [
        chat(temperature=0.7),
        {k: v for k, v in chat().items() if k != "temperature"},
        chat(n=2, temperature=0.5, seed=1),
    ],
    ids=["temperature", "default-temperature", "two-choices"],
)
def test_non_reproducible_requests_are_never_cached(clean_sim, client, body):
    for _ in range(2):
        r = post(client, "/v1/chat/completions", body)
        assert r.status_code == 200
        assert r.headers["x-cache"] == "BYPASS"
    assert generations(clean_sim) == 2


def test_seed_makes_a_request_cacheable(clean_sim, client):
    body = chat(temperature=0.9, seed=42)
    assert post(client, "/v1/chat/completions", body).headers["x-cache"] == "MISS"
    assert post(client, "/v1/chat/completions", body).headers["x-cache"] == "HIT"


def test_cache_control_no_cache_and_no_store(clean_sim, client):
    body = chat()
    first = post(client, "/v1/chat/completions", body)
    fresh = post(client, "/v1/chat/completions", body, **{"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "MISS"
    assert fresh.content != first.content  # a new generation (new id)
    # no-cache stored the fresh answer: it is what a plain request now gets.
    assert post(client, "/v1/chat/completions", body).content == fresh.content
    other = chat()
    skipped = post(client, "/v1/chat/completions", other, **{"Cache-Control": "no-store"})
    assert skipped.headers["x-cache"] == "BYPASS"
    assert post(client, "/v1/chat/completions", other).headers["x-cache"] == "MISS"
    assert generations(clean_sim) == 4  # first, fresh, skipped, other; the plain one hit


def test_errors_are_never_cached(clean_sim, client):
    body = chat()
    failed = post(client, "/v1/chat/completions", body, **{"x-sim-fail-status": "400"})
    assert failed.status_code == 400
    assert post(client, "/v1/chat/completions", body).headers["x-cache"] == "MISS"


def test_cut_streams_are_never_cached(clean_sim, client):
    body = chat(stream=True, max_tokens=20)
    with pytest.raises(httpx.HTTPError):
        stream(client, "/v1/chat/completions", body, **{"x-sim-drop-after": "3"})
    r, raw = stream(client, "/v1/chat/completions", body)
    assert r.headers["x-cache"] == "MISS"
    assert raw.endswith(b"data: [DONE]\n\n")


def test_answers_to_a_client_that_left_are_never_cached(clean_sim, client):
    body = chat(stream=True, max_tokens=50)
    slow = {**auth(), "x-sim-token-delay": "0.05"}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=slow) as r:
        assert r.headers["x-cache"] == "MISS"
        next(r.iter_raw())
    assert clean_sim.wait_aborted(1, timeout=10)["aborted"] >= 1
    again = post(client, "/v1/chat/completions", {**body, "stream": False})
    assert again.headers["x-cache"] == "MISS"  # another body (stream false): a sanity check
    r2, raw = stream(client, "/v1/chat/completions", body)
    assert r2.headers["x-cache"] == "MISS"
    assert raw.endswith(b"data: [DONE]\n\n")


def cache_counts(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics", headers=auth()).text
    found = re.findall(r'^vllm_wrapper_cache_requests_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {result: float(value) for result, value in found}


def test_metrics_count_hits_misses_bypasses_and_replays(clean_sim, client):
    before = cache_counts(client)
    body = chat()
    post(client, "/v1/chat/completions", body)
    post(client, "/v1/chat/completions", body)
    post(client, "/v1/chat/completions", chat(temperature=1.0))
    key = {"Idempotency-Key": uuid.uuid4().hex}
    once = chat(temperature=1.0)
    post(client, "/v1/chat/completions", once, **key)
    replayed = post(client, "/v1/chat/completions", once, **key)
    assert replayed.headers["idempotent-replayed"] == "true"
    after = cache_counts(client)

    def delta(result: str) -> float:
        return after.get(result, 0) - before.get(result, 0)

    assert (delta("hit"), delta("miss")) == (1, 1)
    assert delta("bypass") >= 2  # the temperature-1 one and the first idempotent one
    assert delta("replay") == 1


def test_other_paths_carry_no_cache_header(client):
    r = client.get("/v1/models", headers=auth())
    assert r.status_code == 200
    assert "x-cache" not in r.headers


# ---- Idempotency-Key ----------------------------------------------------------------------


def test_concurrent_duplicates_generate_once(clean_sim, client, gw):
    body = chat(temperature=0.7)  # not cacheable: only idempotency can stop duplicates
    key = uuid.uuid4().hex
    headers = {**auth(), "Idempotency-Key": key, "x-sim-first-byte-delay": "3"}
    go = threading.Barrier(20)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            go.wait(timeout=10)
            return c.post("/v1/chat/completions", json=body, headers=headers)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    ran = [r for r in answers if r.status_code == 200 and "idempotent-replayed" not in r.headers]
    busy = [r for r in answers if r.status_code == 409]
    replayed = [r for r in answers if r.headers.get("idempotent-replayed") == "true"]
    assert len(ran) == 1
    assert busy, [r.status_code for r in answers]
    assert len(ran) + len(busy) + len(replayed) == 20
    for r in busy:
        assert r.json()["error"]["code"] == "idempotency_in_progress"
    assert clean_sim.stats()["completed"] == 1
    assert clean_sim.stats()["by_path"]["/v1/chat/completions"] == 1
    # A retry after it completed gets the stored answer, generating nothing.
    again = client.post("/v1/chat/completions", json=body, headers=headers)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == ran[0].content
    assert clean_sim.stats()["completed"] == 1


def test_stream_is_replayed_under_its_idempotency_key(clean_sim, client):
    body = chat(stream=True, temperature=1.0)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first, raw = stream(client, "/v1/chat/completions", body, **key)
    second, again = stream(client, "/v1/chat/completions", body, **key)
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert again == raw
    assert clean_sim.stats()["completed"] == 1


def test_same_key_other_body_is_422(clean_sim, client):
    key = {"Idempotency-Key": uuid.uuid4().hex}
    assert post(client, "/v1/chat/completions", chat(), **key).status_code == 200
    other = post(client, "/v1/chat/completions", chat(), **key)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert clean_sim.stats()["completed"] == 1


def test_keys_are_scoped_to_the_api_key(clean_sim, client):
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = chat(temperature=1.0)
    first = post(client, "/v1/chat/completions", body, A, **key)
    other = post(client, "/v1/chat/completions", body, B, **key)
    assert other.status_code == 200
    assert "idempotent-replayed" not in other.headers
    assert other.content != first.content
    assert clean_sim.stats()["completed"] == 2


def test_a_cut_first_attempt_does_not_block_the_retry(clean_sim, client):
    body = chat(stream=True, max_tokens=20, temperature=1.0)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    with pytest.raises(httpx.HTTPError):
        stream(client, "/v1/chat/completions", body, **key, **{"x-sim-drop-after": "3"})
    retry, raw = stream(client, "/v1/chat/completions", body, **key)
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers
    assert raw.endswith(b"data: [DONE]\n\n")
    failed = post(client, "/v1/chat/completions", chat(), **{**key, "x-sim-fail-status": "500"})
    assert failed.status_code == 422  # the key now belongs to the completed stream


def test_a_failed_first_attempt_does_not_block_the_retry(clean_sim, client):
    body = chat(temperature=1.0)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    failed = post(client, "/v1/chat/completions", body, **key, **{"x-sim-fail-status": "400"})
    assert failed.status_code == 400
    retry = post(client, "/v1/chat/completions", body, **key)
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers


def test_a_bad_idempotency_key_is_400(client):
    r = post(client, "/v1/chat/completions", chat(), **{"Idempotency-Key": "x" * 300})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "Idempotency-Key"


def test_openai_sdk_retries_with_an_idempotency_key_generate_once(clean_sim, gw):
    """One SDK call is slow; a second (same key) gets 409s, which the SDK retries by itself
    until the first completed, then receives the stored answer."""
    body = chat(temperature=1.0)
    key = uuid.uuid4().hex
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=A, max_retries=8, timeout=30)
    slow = {"Idempotency-Key": key, "x-sim-first-byte-delay": "2"}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(
            sdk.chat.completions.with_raw_response.create, **body, extra_headers=slow
        )
        clean_sim_wait_requests(clean_sim, 1)
        second = pool.submit(
            sdk.chat.completions.with_raw_response.create, **body, extra_headers=slow
        )
        a, b = first.result(), second.result()
    assert a.parse().choices[0].message.content == b.parse().choices[0].message.content
    assert a.parse().id == b.parse().id
    assert b.headers.get("idempotent-replayed") == "true"
    assert clean_sim.stats()["completed"] == 1


def clean_sim_wait_requests(sim: Sim, n: int) -> None:
    r = httpx.get(
        sim.url + "/_sim/wait", params={"field": "requests", "n": n, "timeout": 10}, timeout=15
    )
    assert r.status_code == 200, r.text


# ---- /chat ----------------------------------------------------------------------------------


def test_chat_hit_is_the_miss_bytes(clean_sim, client):
    body = {"messages": [{"role": "user", "content": uuid.uuid4().hex}], "temperature": 0}
    first = post(client, "/chat", body)
    second = post(client, "/chat", body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert first.json()["content"]
    assert generations(clean_sim) == 1


def test_chat_stream_hit_is_the_miss_bytes(clean_sim, client):
    body = {"messages": [{"role": "user", "content": uuid.uuid4().hex}], "temperature": 0}
    body["stream"] = True
    first, raw = stream(client, "/chat", body)
    second, again = stream(client, "/chat", body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert raw.endswith(b"data: [DONE]\n\n")
    assert again == raw
    assert generations(clean_sim) == 1


def test_chat_default_temperature_is_not_reproducible(clean_sim, client):
    body = {"messages": [{"role": "user", "content": uuid.uuid4().hex}]}
    assert post(client, "/chat", body).headers["x-cache"] == "BYPASS"  # default 0.7


def test_chat_conversation_turns_are_not_cached(clean_sim, client):
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "store": True}
    assert post(client, "/chat", body).headers["x-cache"] == "BYPASS"


def test_chat_idempotency_key_replays(clean_sim, client):
    body = {"messages": [{"role": "user", "content": uuid.uuid4().hex}], "temperature": 1.0}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = post(client, "/chat", body, **key)
    second = post(client, "/chat", body, **key)
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert generations(clean_sim) == 1


# ---- limits, shared entries, Redis across gateways --------------------------------------------


LIMITED = f"""
[[keys]]
name = "a"
key = "{A}"
rpm = 100
tpm = 100000

[[keys]]
name = "b"
key = "{B}"

[cache]
enabled = true
shared = true

[state]
backend = "memory"
"""


def usage_of(client: httpx.Client, key: str = A) -> dict:
    return client.get("/usage", headers=auth(key)).json()["keys"][0]["usage"]


def test_a_hit_counts_as_a_request_but_charges_no_tokens(clean_sim, sim, tmp_path):
    with start(sim, tmp_path, LIMITED) as gw2, httpx.Client(base_url=gw2.url, timeout=30) as c:
        body = chat()
        miss = post(c, "/v1/chat/completions", body)
        hit = post(c, "/v1/chat/completions", body)
        assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
        assert hit.headers["x-ratelimit-limit-requests"] == "100"
        assert hit.headers["x-ratelimit-remaining-requests"] == "98"
        tokens = miss.json()["usage"]["total_tokens"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and usage_of(c)["tokens_per_minute"] != tokens:
            time.sleep(0.05)
        assert usage_of(c) == {"requests_per_minute": 2, "tokens_per_minute": tokens}
        # shared = true: another key hits the same entry.
        assert post(c, "/v1/chat/completions", body, B).headers["x-cache"] == "HIT"
    assert generations(clean_sim) == 1


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_two_gateways_share_the_cache_and_idempotency_through_redis(
    clean_sim, sim, tmp_path, redis_server
):
    config = CONFIG.replace('backend = "memory"', f'redis_url = "{redis_server.url}"')
    with (
        start(sim, tmp_path, config) as one,
        start(sim, tmp_path, config) as two,
        httpx.Client(timeout=30) as c,
    ):
        body = chat(stream=True)
        first, raw = stream(c, one.url + "/v1/chat/completions", body)
        second, again = stream(c, two.url + "/v1/chat/completions", body)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert again == raw
        assert generations(clean_sim) == 1

        slow = {**auth(), "Idempotency-Key": uuid.uuid4().hex, "x-sim-first-byte-delay": "2"}
        other = chat(temperature=1.0)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                c.post, one.url + "/v1/chat/completions", json=other, headers=slow
            )
            clean_sim_wait_requests(clean_sim, 2)
            busy = c.post(two.url + "/v1/chat/completions", json=other, headers=slow)
            done = running.result()
        assert busy.status_code == 409
        replay = c.post(two.url + "/v1/chat/completions", json=other, headers=slow)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == done.content
        assert generations(clean_sim) == 2


@pytest.mark.parametrize("bounded", [True, False], ids=["2MiB", "256MiB-control"])
def test_memory_stays_bounded_under_many_large_answers(clean_sim, sim, tmp_path, bounded):
    """60 distinct ~0.5 MB streamed answers (30 MB) through a cache of 2 MiB: the oldest
    are evicted (MISS again), the newest hit, and the gateway's RSS grows by far less than
    what passed through. The control (a 256 MiB cache keeps them all) shows that the RSS
    measurement sees stored answers."""
    max_bytes = 2 * 1024 * 1024 if bounded else 256 * 1024 * 1024
    config = CONFIG.replace("enabled = true", f"enabled = true\nmax_bytes = {max_bytes}")
    big = {"x-sim-tokens": "2000"}
    with start(sim, tmp_path, config) as gw2, httpx.Client(base_url=gw2.url, timeout=60) as c:
        assert gw2.proc is not None
        stream(c, "/v1/chat/completions", chat(stream=True, max_tokens=2000), **big)  # warm-up
        before = rss_bytes(gw2.proc.pid)
        bodies = [chat(stream=True, max_tokens=2000) for _ in range(60)]
        total = 0
        for body in bodies:
            r, raw = stream(c, "/v1/chat/completions", body, **big)
            assert r.headers["x-cache"] == "MISS"
            total += len(raw)
        grown = rss_bytes(gw2.proc.pid) - before
        assert total > 25 * 1024 * 1024
        last = stream(c, "/v1/chat/completions", bodies[-1], **big)[0].headers["x-cache"]
        first = stream(c, "/v1/chat/completions", bodies[0], **big)[0].headers["x-cache"]
        assert last == "HIT"
        if bounded:
            assert grown < total / 3, (grown, total)
            assert first == "MISS"
        else:
            assert grown > total / 2, (grown, total)
            assert first == "HIT"


def test_openai_sdk_timeout_and_retry_with_an_idempotency_key_completes_once(clean_sim, gw):
    """A flaky first attempt (the SDK gives up on it after 1.5 s and drops the connection):
    the gateway releases the key, the SDK's own retry runs, one generation completes."""
    clean_sim.faults(first_byte_delay=5, count=1)
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=A, max_retries=3, timeout=1.5)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = chat(temperature=1.0)
    answer = sdk.chat.completions.with_raw_response.create(**body, extra_headers=key)
    assert answer.parse().choices[0].message.content
    assert "idempotent-replayed" not in answer.headers
    assert clean_sim.stats()["by_path"]["/v1/chat/completions"] == 2  # the cut one, the retry
    assert clean_sim.stats()["completed"] == 1
    again = sdk.chat.completions.with_raw_response.create(**body, extra_headers=key)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.parse().id == answer.parse().id
    assert clean_sim.stats()["completed"] == 1
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.chat.completions.create(**chat(), extra_headers=key)
