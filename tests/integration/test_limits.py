"""Keys, limits and quotas through real gateway processes, the simulator and a real
``redis-server``: exact counts across processes, leases that expire, the usage
chunk added and stripped byte for byte, OpenAI's 429s and headers."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import GATEWAY_ENV, MODEL, Sim
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess, gateway_server

A, B, ADMIN = "team-a-secret", "team-b-secret", "admin-secret"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(max_tokens: int = 3, **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def write_config(tmp_path: Path, body: str, state: str = "") -> str:
    path = tmp_path / "gateway.toml"
    state = state or f'[state]\npath = "{tmp_path / "state.db"}"\n'
    path.write_text(body + "\n" + state)
    return str(path)


def start(sim: Sim, config: str, *extra: str, env: dict | None = None) -> ServerProcess:
    """The gateway, not yet started: ``with start(...) as gw`` starts and stops it."""
    return gateway_server(
        sim.base_url, "--config", config, *extra, env={**GATEWAY_ENV, **(env or {})}
    )


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def key_toml(name: str, secret: str, limits: str = "", extra: str = "") -> str:
    return f'[[keys]]\nname = "{name}"\nkey = "{secret}"\n{limits}\n{extra}\n'


def usage(gw: ServerProcess, key: str, name: str | None = None) -> dict:
    params = {"key": name} if name else None
    r = httpx.get(gw.url + "/usage", headers=auth(key), params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["keys"][0]


# ---- exact across processes -------------------------------------------------------------


def test_rpm_is_exact_across_three_gateways_on_one_redis(
    sim: Sim, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        key_toml("team-a", A, "rpm = 60"),
        state=f'[state]\nredis_url = "{redis_server.url}"\n',
    )
    with ExitStack() as stack:
        gws = [stack.enter_context(start(sim, config)) for _ in range(3)]
        sim.reset()

        def one(i: int) -> int:
            r = httpx.post(
                gws[i % 3].url + "/v1/chat/completions",
                json=chat(1),
                headers=auth(A),
                timeout=30,
            )
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                assert r.json()["error"]["type"] == "requests"
                assert 0 < int(r.headers["retry-after"]) <= 60
            return r.status_code

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(one, range(200)))
        assert statuses.count(200) == 60, statuses
        assert statuses.count(429) == 140
        assert sim.stats()["by_path"].get("/v1/chat/completions") == 60
        assert usage(gws[0], A)["usage"]["requests_per_minute"] == 60


def test_workers_without_redis_share_one_sqlite_count(sim: Sim, tmp_path: Path) -> None:
    config = write_config(tmp_path, key_toml("team-a", A, "rpm = 20"))
    with start(sim, config, "--workers", "2") as gw:

        def one(_: int) -> int:
            r = httpx.post(
                gw.url + "/v1/chat/completions", json=chat(1), headers=auth(A), timeout=30
            )
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(50)))
        assert statuses.count(200) == 20, statuses
        assert statuses.count(429) == 30


def test_tpm_window_equals_the_real_usage_of_streams(
    sim: Sim, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        key_toml("team-a", A, "tpm = 100000\ndaily_tokens = 1000000"),
        state=f'[state]\nredis_url = "{redis_server.url}"\n',
    )
    with start(sim, config) as gw:
        sim.reset()
        reported = 0
        for i in range(6):
            body = chat(3 + i, stream=True)
            if i % 2:
                body["stream_options"] = {"include_usage": True}
            with httpx.stream(
                "POST", gw.url + "/v1/chat/completions", json=body, headers=auth(A), timeout=30
            ) as r:
                assert r.status_code == 200
                assert r.headers["x-ratelimit-limit-tokens"] == "100000"
                text = r.read().decode()
            assert text.endswith("data: [DONE]\n\n")
            has_usage = '"usage":' in text
            assert has_usage is bool(i % 2)  # the usage chunk only for those who asked
            if has_usage:
                u = re.search(r'"total_tokens":(\d+)', text)
                assert u is not None
                reported += int(u.group(1))
        stats = sim.stats()
        real = stats["prompt_tokens"] + stats["generation_tokens"]
        assert reported and real > reported

        def settled() -> bool:
            return usage(gw, A)["usage"]["tokens_per_minute"] == real

        eventually(settled)
        assert usage(gw, A)["usage"]["tokens_today"] == real


def eventually(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ---- max_parallel and leases ---------------------------------------------------------------


def test_max_parallel_two_of_ten_streams(sim: Sim, tmp_path: Path) -> None:
    config = write_config(tmp_path, key_toml("team-a", A, "max_parallel = 2"))
    with start(sim, config) as gw:
        sim.reset()
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, sim.stats()["open_streams"])
                time.sleep(0.01)

        def one(_: int) -> int:
            with httpx.stream(
                "POST",
                gw.url + "/v1/chat/completions",
                json=chat(20, stream=True),
                headers={**auth(A), "x-sim-token-delay": "0.05", "x-sim-tokens": "20"},
                timeout=30,
            ) as r:
                r.read()
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1"
                    assert "max_parallel" in r.json()["error"]["message"]
                return r.status_code

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(10) as pool:
                statuses = list(pool.map(one, range(10)))
        finally:
            stop.set()
            watcher.join()
        assert statuses.count(200) >= 2
        assert statuses.count(200) + statuses.count(429) == 10
        assert peak <= 2
        # every slot was given back: two more run at once
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(one, range(2))) == [200, 200]


def test_a_killed_gateway_leaves_no_slot_locked(
    sim: Sim, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        key_toml("team-a", A, "max_parallel = 1") + "[limits]\nlease_seconds = 2\n",
        state=f'[state]\nredis_url = "{redis_server.url}"\n',
    )
    doomed = start(sim, config).start()
    survivor = start(sim, config).start()
    try:
        started = threading.Event()

        def hold() -> None:
            try:
                with httpx.stream(
                    "POST",
                    doomed.url + "/v1/chat/completions",
                    json=chat(400, stream=True),
                    headers={**auth(A), "x-sim-token-delay": "0.05", "x-sim-tokens": "400"},
                    timeout=30,
                ) as r:
                    events = 0
                    for line in r.iter_lines():
                        events += line.startswith("data: ")
                        if events >= 60:  # >= 3 s of tokens: longer than the 2 s lease
                            started.set()
            except httpx.HTTPError:
                pass

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(20)
        # The slot outlived its 2 s lease: the running gateway renewed it.
        busy = httpx.post(survivor.url + "/v1/chat/completions", json=chat(1), headers=auth(A))
        assert busy.status_code == 429
        doomed.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        holder.join(10)

        def free() -> bool:
            r = httpx.post(
                survivor.url + "/v1/chat/completions", json=chat(1), headers=auth(A), timeout=10
            )
            return r.status_code == 200

        eventually(free, timeout=20)
    finally:
        doomed.stop()
        survivor.stop()


# ---- quotas ----------------------------------------------------------------------------


def test_daily_quota_survives_a_restart_then_refuses(sim: Sim, tmp_path: Path) -> None:
    config = write_config(tmp_path, key_toml("team-a", A, "daily_tokens = 60"))
    with start(sim, config) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", json=chat(8), headers=auth(A))
        assert r.status_code == 200
        used = r.json()["usage"]["total_tokens"]
        eventually(lambda: usage(gw, A)["usage"]["tokens_today"] == used)
    with start(sim, config) as gw:
        assert usage(gw, A)["usage"]["tokens_today"] == used
        for _ in range(10):  # bounded: 60 tokens run out within a few requests
            r = httpx.post(gw.url + "/v1/chat/completions", json=chat(8), headers=auth(A))
            if r.status_code == 429:
                break
            assert r.status_code == 200
        assert r.status_code == 429
        error = r.json()["error"]
        assert error["type"] == error["code"] == "insufficient_quota"
        assert r.headers["x-should-retry"] == "false"
        assert "retry-after" not in r.headers
        assert error["param"] is None and "daily" in error["message"]


# ---- errors and headers ------------------------------------------------------------------


def test_errors_and_headers(sim: Sim, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        key_toml("team-a", A, "rpm = 2\ntpm = 5000", 'models = ["tiny-llama"]')
        + key_toml("old", "old-secret", "", "expires = 2020-01-01T00:00:00Z")
        + key_toml("tok", B, "tpm = 200"),
    )
    with start(sim, config) as gw:
        url = gw.url + "/v1/chat/completions"
        r = httpx.post(url, json={**chat(2), "model": MODEL}, headers=auth(A))
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "model_not_allowed"
        assert "team-a-secret" not in r.text

        ok = httpx.post(url, json={**chat(2), "model": "tiny-llama"}, headers=auth(A))
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert ok.headers["x-ratelimit-limit-tokens"] == "5000"
        assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 5000
        assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s|\d+ms", ok.headers["x-ratelimit-reset-requests"])
        with httpx.stream(
            "POST", url, json={**chat(2, stream=True), "model": "tiny-llama"}, headers=auth(A)
        ) as s:
            assert s.status_code == 200
            assert s.headers["x-ratelimit-remaining-requests"] == "0"
            s.read()
        refused = httpx.post(url, json={**chat(2), "model": "tiny-llama"}, headers=auth(A))
        assert refused.status_code == 429
        assert refused.json() == {
            "error": {
                "message": refused.json()["error"]["message"],
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
        assert "Please try again in" in refused.json()["error"]["message"]
        assert 0 < int(refused.headers["retry-after"]) <= 60
        assert 0 < int(refused.headers["retry-after-ms"]) <= 60000
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"

        big = httpx.post(url, json=chat(150), headers=auth(B))
        assert big.status_code == 200
        tokens = httpx.post(url, json=chat(150), headers=auth(B))
        assert tokens.status_code == 429
        assert tokens.json()["error"]["type"] == "tokens"
        assert "retry-after" in tokens.headers

        expired = httpx.post(url, json=chat(1), headers=auth("old-secret"))
        assert expired.status_code == 401
        assert "expired" in expired.json()["error"]["message"]
    assert "team-a-secret" not in gw.log_text()
    assert "key=team-a" in gw.log_text()


def test_openai_sdk_backs_off_and_succeeds(sim: Sim, tmp_path: Path) -> None:
    config = write_config(tmp_path, key_toml("team-a", A, "max_parallel = 1"))
    with start(sim, config) as gw:
        statuses: list[int] = []
        http = httpx.Client(event_hooks={"response": [lambda r: statuses.append(r.status_code)]})
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=A, max_retries=5, http_client=http)
        busy = threading.Event()

        def hold() -> None:
            with httpx.stream(
                "POST",
                gw.url + "/v1/chat/completions",
                json=chat(30, stream=True),
                headers={**auth(A), "x-sim-token-delay": "0.05", "x-sim-tokens": "30"},
                timeout=30,
            ) as r:
                for _ in r.iter_bytes():
                    busy.set()

        holder = threading.Thread(target=hold)
        holder.start()
        assert busy.wait(10)
        answer = client.chat.completions.create(**chat(2))
        holder.join(30)
        assert answer.choices[0].message.content
        assert statuses[0] == 429 and statuses[-1] == 200


# ---- the usage chunk, byte for byte --------------------------------------------------------


def _normal(data: bytes) -> bytes:
    data = re.sub(rb'"id":"[^"]+"', b'"id":""', data)
    return re.sub(rb'"created":\d+', b'"created":0', data)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_bytes_equal_direct(
    sim: Sim, tmp_path: Path, path: str, include_usage: bool
) -> None:
    config = write_config(tmp_path, key_toml("team-a", A, "tpm = 100000"))
    if path.endswith("chat/completions"):
        body = chat(6, stream=True)
    else:
        body = {
            "model": MODEL,
            "prompt": "Once upon",
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
        }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with start(sim, config) as gw:
        direct = httpx.post(sim.base_url + path[3:], json=body, timeout=30).content
        via = httpx.post(gw.url + path, json=body, headers=auth(A), timeout=30).content
        assert sim.stats()["last_request"]["body"].count("include_usage") == 1
    assert _normal(via) == _normal(direct)
    assert (b'"usage":' in via) is include_usage
    assert b'"system_fingerprint"' in via


# ---- /usage, /chat, and nothing touched without limits --------------------------------------


def test_usage_endpoint_and_chat_share_the_limits(sim: Sim, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        key_toml("team-a", A, "rpm = 3\ndaily_tokens = 100000")
        + key_toml("team-b", B, "tpm = 1000")
        + key_toml("ops", ADMIN, "", "admin = true"),
    )
    with start(sim, config) as gw:
        statuses = []
        for _ in range(4):
            r = httpx.post(
                gw.url + "/chat",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                headers=auth(A),
                timeout=30,
            )
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 429]
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        with httpx.stream(
            "POST",
            gw.url + "/chat",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
            headers=auth(B),
            timeout=30,
        ) as s:
            assert s.headers["x-ratelimit-limit-tokens"] == "1000"
            assert s.read().endswith(b"data: [DONE]\n\n")

        mine = usage(gw, A)
        assert mine["name"] == "team-a"
        assert mine["limits"] == {"rpm": 3, "daily_tokens": 100000}
        assert mine["usage"]["requests_per_minute"] == 3
        eventually(lambda: usage(gw, A)["usage"]["tokens_today"] > 0)
        other = httpx.get(gw.url + "/usage", params={"key": "team-b"}, headers=auth(A))
        assert other.status_code == 403
        everyone = httpx.get(gw.url + "/usage", headers=auth(ADMIN)).json()["keys"]
        assert {k["name"] for k in everyone} == {"team-a", "team-b", "ops"}
        assert usage(gw, ADMIN, "team-b")["usage"]["tokens_per_minute"] > 0
        missing = httpx.get(gw.url + "/usage", params={"key": "nobody"}, headers=auth(ADMIN))
        assert missing.status_code == 404


def test_no_limits_touch_no_state(sim: Sim, tmp_path: Path) -> None:
    config = write_config(tmp_path, key_toml("team-a", A) + key_toml("team-b", B))
    with start(sim, config, env={"VLLM_WRAPPER_API_KEY": "k1, k2"}) as gw:
        for key in (A, B, "k1", "k2"):
            r = httpx.post(gw.url + "/v1/chat/completions", json=chat(1), headers=auth(key))
            assert r.status_code == 200
            assert "x-ratelimit-limit-requests" not in r.headers
        assert httpx.post(gw.url + "/v1/models", headers=auth("k3")).status_code == 401
    assert not (tmp_path / "state.db").exists()


# ---- Redis failures --------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_redis_stopped_and_started_again(sim: Sim, tmp_path: Path, on_error: str) -> None:
    redis = RedisServer().start()
    config = write_config(
        tmp_path,
        key_toml("team-a", A, "rpm = 1000"),
        state=f'[state]\nredis_url = "{redis.url}"\non_error = "{on_error}"\ntimeout = 0.2\n',
    )
    try:
        with start(sim, config) as gw:
            url = gw.url + "/v1/chat/completions"
            assert httpx.post(url, json=chat(1), headers=auth(A)).status_code == 200
            redis.stop()
            down = [httpx.post(url, json=chat(1), headers=auth(A), timeout=10) for _ in range(5)]
            if on_error == "open":
                assert [r.status_code for r in down] == [200] * 5
            else:
                assert [r.status_code for r in down] == [503] * 5
                assert down[0].json()["error"]["code"] == "state_unavailable"
                assert down[0].headers["retry-after"] == "1"
            assert gw.log_text().count("unavailable") >= 1
            redis.start()
            eventually(lambda: httpx.post(url, json=chat(1), headers=auth(A)).status_code == 200)
            assert usage(gw, A)["usage"]["requests_per_minute"] >= 1  # counting again
    finally:
        redis.__exit__()


def test_a_slow_redis_does_not_stall_requests(sim: Sim, tmp_path: Path) -> None:
    import socket

    redis = RedisServer().start()
    config = write_config(
        tmp_path,
        key_toml("team-a", A, "rpm = 1000"),
        state=f'[state]\nredis_url = "{redis.url}"\ntimeout = 0.2\n',
    )
    try:
        with start(sim, config) as gw:
            url = gw.url + "/v1/chat/completions"
            assert httpx.post(url, json=chat(1), headers=auth(A)).status_code == 200

            def stall() -> None:  # Redis answers nothing for 8 s
                with socket.create_connection(("127.0.0.1", redis.port), timeout=30) as s:
                    s.sendall(b"DEBUG SLEEP 8\r\n")
                    s.recv(16)

            sleeper = threading.Thread(target=stall)
            sleeper.start()

            def asleep() -> bool:  # a PING goes unanswered once the DEBUG SLEEP runs
                with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as s:
                    s.settimeout(0.1)
                    s.sendall(b"PING\r\n")
                    try:
                        return not s.recv(16)
                    except TimeoutError:
                        return True

            eventually(asleep, timeout=5)
            statuses = [
                httpx.post(url, json=chat(1), headers=auth(A), timeout=30).status_code
                for _ in range(3)
            ]
            # All answered (admitted: on_error = "open") while Redis was still asleep.
            assert sleeper.is_alive()
            assert statuses == [200, 200, 200]
            sleeper.join(30)
    finally:
        redis.__exit__()
