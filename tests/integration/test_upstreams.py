"""Many upstreams, as real processes: simulators behind the gateway started with a config file.

Spread and weights, routing by model, session affinity, failover when an upstream
dies, ejection and rejoin, a black-holed upstream, load-aware routing on vLLM's
queue, reload under load, and credentials in an upstream URL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.integration.conftest import GATEWAY_ENV, Sim
from tests.support.servers import ServerProcess, gateway_server, sim_server

MODEL = GATEWAY_ENV["VLLM_MODEL"]
CHAT = "/v1/chat/completions"
ENV = {
    **GATEWAY_ENV,
    "VLLM_WRAPPER_HEALTH_TIMEOUT": "1",
    "VLLM_WRAPPER_CONNECT_TIMEOUT": "0.5",
    "VLLM_TIMEOUT": "60",
}
FAST_HEALTH = {"probe_interval": 0.3, "eject_backoff": 0.5, "eject_backoff_max": 2.0}


def body(model: str = MODEL, **extra: object) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hello! How are you?"}],
        "max_tokens": 4,
        **extra,
    }


def toml_value(v: object) -> str:
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def write_config(path: Path, upstreams: Sequence[dict], routing: dict | None = None) -> str:
    lines: list[str] = []
    for entry in upstreams:
        lines.append("[[upstreams]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    if routing:
        lines.append("[routing]")
        lines += [f"{k} = {toml_value(v)}" for k, v in routing.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@contextmanager
def sims(n: int, *args: str, models: Sequence[str] | None = None) -> Iterator[list[Sim]]:
    started: list[ServerProcess] = []
    try:
        for i in range(n):
            model = models[i] if models else MODEL
            started.append(sim_server("--model", model, "--log-level", "warning", *args).start())
        yield [Sim(s) for s in started]
    finally:
        for s in started:
            s.stop()


@contextmanager
def gateway(config: str, env: dict | None = None) -> Iterator[ServerProcess]:
    with gateway_server(
        "http://127.0.0.1:9/v1", env={**ENV, "VLLM_WRAPPER_CONFIG": config, **(env or {})}
    ) as gw:
        yield gw


def chats(sim: Sim) -> int:
    return sim.stats()["by_path"].get(CHAT, 0)


def kill(sim: Sim) -> None:
    """SIGKILL: no graceful end, connections in flight are cut."""
    proc = sim.server.proc
    assert proc is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def restart(sim: Sim, *args: str) -> Sim:
    server = sim_server(
        "--model", MODEL, "--log-level", "warning", *args, port=sim.server.port
    ).start()
    return Sim(server)


def wait_health(gw: ServerProcess, url: str, healthy: bool, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = {
            u["url"]: u for u in httpx.get(gw.url + "/health", timeout=10).json()["upstreams"]
        }
        if listed[url]["healthy"] is healthy:
            return listed[url]
        time.sleep(0.1)
    raise AssertionError(f"{url} not healthy={healthy} within {timeout}s: {listed[url]}")


def run_parallel(n_threads: int, per_thread: int, send) -> list[object]:
    results: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(per_thread):
                outcome = send(client)
                with lock:
                    results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


# ---- spread and weights -----------------------------------------------------------------


def test_equal_weights_spread_evenly_and_weights_are_respected(tmp_path: Path) -> None:
    with sims(3) as fleet:
        config = write_config(tmp_path / "gw.toml", [{"url": s.base_url} for s in fleet])
        with gateway(config) as gw:
            codes = run_parallel(4, 75, lambda c: c.post(gw.url + CHAT, json=body()).status_code)
            assert codes == [200] * 300
            counts = [chats(s) for s in fleet]
            assert sum(counts) == 300
            assert max(counts) <= 150, counts  # no upstream above 1.5x its fair share of 100
            assert min(counts) >= 50, counts
        for s in fleet:
            s.reset()
        config = write_config(
            tmp_path / "w.toml",
            [{"url": fleet[0].base_url, "weight": 1}, {"url": fleet[1].base_url, "weight": 3}],
        )
        with gateway(config) as gw:
            # One at a time, so in-flight counts tie and the weighted draw decides; under
            # concurrency least-busy balances requests in flight per unit of weight instead.
            codes = run_parallel(1, 200, lambda c: c.post(gw.url + CHAT, json=body()).status_code)
            assert codes == [200] * 200
            light, heavy, unused = (chats(s) for s in fleet)
            assert unused == 0 and light + heavy == 200
            assert 0.62 <= heavy / 200 <= 0.88, (light, heavy)  # fair share 0.75


def test_round_robin_is_exact(tmp_path: Path) -> None:
    with sims(3) as fleet:
        weights = [1, 1, 3]
        config = write_config(
            tmp_path / "gw.toml",
            [{"url": s.base_url, "weight": w} for s, w in zip(fleet, weights, strict=True)],
            {"policy": "round-robin"},
        )
        with gateway(config) as gw:
            codes = run_parallel(3, 50, lambda c: c.post(gw.url + CHAT, json=body()).status_code)
            assert codes == [200] * 150
            assert [chats(s) for s in fleet] == [30, 30, 90]


# ---- routing by model -------------------------------------------------------------------


def test_each_model_reaches_only_its_upstreams(tmp_path: Path) -> None:
    with sims(3, models=["big", "small", "big,other"]) as (big1, small, big2):
        config = write_config(
            tmp_path / "gw.toml",
            [
                {"url": big1.base_url},  # models discovered from its /v1/models
                {"url": small.base_url, "models": ["small"]},
                {"url": big2.base_url, "models": ["big"]},  # it serves "other" too: not routed
            ],
        )
        with gateway(config, {"VLLM_MODEL": "big"}) as gw, httpx.Client(timeout=30) as client:
            for model in ["big"] * 20 + ["small"] * 10:
                r = client.post(gw.url + CHAT, json=body(model))
                assert r.status_code == 200 and r.json()["model"] == model
            assert chats(small) == 10
            assert chats(big1) + chats(big2) == 20 and chats(big1) and chats(big2)
            for model in ("other", "no-such-model"):
                r = client.post(gw.url + CHAT, json=body(model))
                assert r.status_code == 404
                assert r.json()["error"]["code"] == "model_not_found"
                assert r.json()["error"]["param"] == "model"
            assert chats(big1) + chats(big2) + chats(small) == 30  # the 404s went nowhere
            # A request without a model goes to an upstream of VLLM_MODEL.
            r = client.post(gw.url + CHAT, json={k: v for k, v in body().items() if k != "model"})
            assert r.status_code == 200 and r.json()["model"] == "big"
            for path in ("/v1/models", "/models"):
                listed = client.get(gw.url + path).json()
                assert listed["object"] == "list"
                assert sorted(m["id"] for m in listed["data"]) == ["big", "small"]
                assert all(m["object"] == "model" for m in listed["data"])
            one = client.get(gw.url + "/v1/models/small")
            assert one.status_code == 200 and one.json()["id"] == "small"
            assert client.get(gw.url + "/v1/models/other").status_code == 404
            # /chat routes the same way.
            r = client.post(
                gw.url + "/chat",
                json={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200 and chats(small) == 11


# ---- session affinity -------------------------------------------------------------------


def test_a_session_sticks_and_comes_back_after_recovery(tmp_path: Path) -> None:
    with sims(3) as fleet:
        config = write_config(
            tmp_path / "gw.toml",
            [{"url": s.base_url} for s in fleet],
            {"policy": "session", **FAST_HEALTH},
        )
        with gateway(config) as gw, httpx.Client(timeout=30) as client:

            def send(n: int, **kw: object) -> list[int]:
                before = [chats(s) for s in fleet if s.server.proc.poll() is None]
                for _ in range(n):
                    assert client.post(gw.url + CHAT, **kw).status_code == 200
                return before

            send(10, json=body(), headers={"x-session-id": "s-1"})
            counts = [chats(s) for s in fleet]
            assert sorted(counts) == [0, 0, 10]
            home = fleet[counts.index(10)]
            # The OpenAI `user` field works as a session key too.
            for s in fleet:
                s.reset()
            send(6, json=body(user="alice"))
            assert sorted(chats(s) for s in fleet) == [0, 0, 6]
            for s in fleet:
                s.reset()

            kill(home)
            others = [s for s in fleet if s is not home]
            send(10, json=body(), headers={"x-session-id": "s-1"})
            assert sorted(chats(s) for s in others) == [0, 10]  # moved, and stays together
            back = restart(home)
            try:
                wait_health(gw, back.base_url, healthy=True)
                send(5, json=body(), headers={"x-session-id": "s-1"})
                assert chats(back) == 5  # home again
            finally:
                back.server.stop()


# ---- failover, ejection, rejoin --------------------------------------------------------


def test_stopping_an_upstream_mid_run_fails_no_request(tmp_path: Path) -> None:
    with sims(3, "--token-delay", "0.01") as fleet:
        victim = fleet[2]
        config = write_config(
            tmp_path / "gw.toml", [{"url": s.base_url} for s in fleet], FAST_HEALTH
        )
        with gateway(config) as gw:
            done = threading.Event()
            statuses: list[int] = []

            def send(client: httpx.Client) -> int:
                r = client.post(gw.url + CHAT, json=body(max_tokens=10))
                statuses.append(r.status_code)
                if len(statuses) == 40:
                    done.set()
                return r.status_code

            killer = threading.Thread(target=lambda: (done.wait(60), kill(victim)))
            killer.start()
            codes = run_parallel(6, 25, send)
            killer.join(60)
            assert codes == [200] * 150  # unary: nothing had reached the client, so failover
            assert f"upstream {victim.base_url} out of rotation" in gw.log_text()
            listed = wait_health(gw, victim.base_url, healthy=False)
            assert listed["last_error"]
            before = [chats(s) for s in fleet[:2]]
            back = restart(victim, "--token-delay", "0.01")
            try:
                wait_health(gw, back.base_url, healthy=True)
                with httpx.Client(timeout=30) as client:
                    for _ in range(30):
                        assert client.post(gw.url + CHAT, json=body()).status_code == 200
                assert chats(back) > 0  # rejoined the rotation
                assert sum(chats(s) for s in fleet[:2]) - sum(before) + chats(back) == 30
            finally:
                back.server.stop()


@contextmanager
def black_hole(port: int) -> Iterator[None]:
    """A listener on ``port`` that never accepts, its accept queue full: connects hang."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(0)
    fillers = []
    try:
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        yield
    finally:
        for c in fillers:
            c.close()
        server.close()


def test_a_black_holed_upstream_is_failed_over_within_the_connect_timeout(tmp_path: Path) -> None:
    with sims(2) as (good, doomed):
        config = write_config(
            tmp_path / "gw.toml",
            [{"url": good.base_url}, {"url": doomed.base_url}],
            {"probe_interval": 60, "eject_after": 1},  # only real requests find it out
        )
        env = {"VLLM_WRAPPER_KEEPALIVE_EXPIRY": "0"}  # a new connection per request
        with gateway(config, env) as gw:
            kill(doomed)
            with black_hole(doomed.server.port), httpx.Client(timeout=20) as client:
                # VLLM_TIMEOUT is 60 s: a request waiting on it would outlast the client.
                for _ in range(12):  # about half are sent to the black hole first
                    r = client.post(gw.url + CHAT, json=body())
                    assert r.status_code == 200
                assert chats(good) == 12
                log = gw.log_text()
                assert "connect timeout" in log
                assert f"upstream {doomed.base_url} out of rotation" in log


# ---- load-aware ------------------------------------------------------------------------


def test_load_aware_sends_new_work_away_from_the_long_queue(tmp_path: Path) -> None:
    with sims(3, "--max-running", "1", "--token-delay", "0.05") as fleet:
        busy = fleet[0]
        config = write_config(
            tmp_path / "gw.toml",
            [{"url": s.base_url} for s in fleet],
            {"policy": "load-aware", "metrics_interval": 0.2},
        )
        with gateway(config) as gw:
            stop = threading.Event()

            def hold() -> None:  # a long generation straight to `busy`
                with (
                    httpx.Client(timeout=60) as client,
                    client.stream(
                        "POST",
                        busy.base_url + "/chat/completions",
                        json=body(max_tokens=400, stream=True),
                    ) as r,
                ):
                    for _ in r.iter_lines():
                        if stop.is_set():
                            return

            holders = [threading.Thread(target=hold) for _ in range(4)]
            for t in holders:
                t.start()
            try:
                r = httpx.get(
                    busy.url + "/_sim/wait",
                    params={"field": "waiting", "n": 3, "timeout": 20},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    load = wait_health(gw, busy.base_url, healthy=True)["load"]
                    if load and load["waiting"] >= 3:
                        break
                    time.sleep(0.1)
                else:
                    raise AssertionError("the gateway never saw the queue")
                before = chats(busy)
                with httpx.Client(timeout=30) as client:
                    for _ in range(20):
                        assert (
                            client.post(gw.url + CHAT, json=body(max_tokens=2)).status_code == 200
                        )
                assert chats(busy) == before  # none of the new work went to the queue
                assert chats(fleet[1]) + chats(fleet[2]) == 20
            finally:
                stop.set()
                for t in holders:
                    t.join(30)


# ---- reload -----------------------------------------------------------------------------


def test_reload_under_load_drops_no_request(tmp_path: Path) -> None:
    with sims(3, "--token-delay", "0.01") as (a, b, c):
        path = tmp_path / "gw.toml"
        config = write_config(path, [{"url": a.base_url}, {"url": b.base_url}], FAST_HEALTH)
        with gateway(config) as gw:
            count = [0]
            reloaded = threading.Event()

            def send(client: httpx.Client) -> tuple[int, bool]:
                with client.stream(
                    "POST", gw.url + CHAT, json=body(max_tokens=15, stream=True)
                ) as r:
                    text = b"".join(r.iter_raw())
                count[0] += 1
                return r.status_code, text.endswith(b"data: [DONE]\n\n")

            def reloader() -> None:
                while count[0] < 30:
                    time.sleep(0.01)
                write_config(path, [{"url": b.base_url}, {"url": c.base_url}], FAST_HEALTH)
                gw.send_signal(signal.SIGHUP)
                while "config reloaded" not in gw.log_text():
                    time.sleep(0.05)
                # A bad file over HTTP is refused and changes nothing.
                path.write_text('[[upstreams]]\nurl = "http://x:1/v1"\nweight = "heavy"\n')
                r = httpx.post(gw.url + "/admin/reload", timeout=10)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_config"
                assert "upstreams[0].weight" in r.json()["error"]["message"]
                reloaded.set()

            thread = threading.Thread(target=reloader)
            thread.start()
            results = run_parallel(6, 20, send)
            thread.join(60)
            assert reloaded.is_set()
            assert results == [(200, True)] * 120
            assert chats(c) > 0  # the new upstream took work
            listed = [u["url"] for u in httpx.get(gw.url + "/health").json()["upstreams"]]
            assert listed == [b.base_url, c.base_url]  # the bad file changed nothing
            before = chats(a)
            with httpx.Client(timeout=30) as client:
                for _ in range(10):
                    assert client.post(gw.url + CHAT, json=body()).status_code == 200
            assert chats(a) == before  # removed: no new work
            log = gw.log_text()
            assert "config reload refused, the running configuration stays" in log


def test_admin_reload_needs_the_key_when_auth_is_on(tmp_path: Path) -> None:
    with sims(1) as (a,):
        path = tmp_path / "gw.toml"
        config = write_config(path, [{"url": a.base_url}])
        with gateway(config, {"VLLM_WRAPPER_API_KEY": "admin-key"}) as gw:
            assert httpx.post(gw.url + "/admin/reload").status_code == 401
            r = httpx.post(gw.url + "/admin/reload", headers={"authorization": "Bearer admin-key"})
            assert r.status_code == 200 and r.json()["status"] == "reloaded"


# ---- the command line ----------------------------------------------------------------------


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--env-file", "", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_and_a_bad_file_at_start(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.toml", [{"url": "http://127.0.0.1:9/v1"}])
    result = _cli(["--config", good, "--check-config"])
    assert result.returncode == 0 and "ok" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[upstreams]]\nurl = "http://127.0.0.1:9/v1"\nweigth = 2\n')
    result = _cli(["--config", str(bad), "--check-config"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}: upstreams[0].weigth: unknown key (known here: api_key, api_key_env, "
        "max_connections, models, url, weight)"
    ]
    started = _cli(["--config", str(bad), "--port", "0"])
    assert started.returncode == 2
    assert len(started.stderr.strip().splitlines()) == 1
    assert "upstreams[0].weigth" in started.stderr and "Traceback" not in started.stderr


# ---- credentials in the URL ---------------------------------------------------------------


def test_credentials_in_the_upstream_url(tmp_path: Path) -> None:
    with sims(1) as (sim,):
        secret_url = sim.base_url.replace("http://", "http://user:hunter2@")
        result = _cli([], {"VLLM_BASE_URL": secret_url, "VLLM_API_KEY": "sk-up"})
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Authorization" in result.stderr and "hunter2" not in result.stderr
        with gateway_server(secret_url, env=ENV) as gw:
            health = httpx.get(gw.url + "/health", timeout=10)
            assert health.status_code == 200 and health.json()["status"] == "healthy"
            assert "hunter2" not in health.text
            r = httpx.post(gw.url + CHAT, json=body(), timeout=30)
            assert r.status_code == 200
            sent = dict(sim.stats()["last_request"]["headers"])
            assert sent["authorization"] == "Basic dXNlcjpodW50ZXIy"  # user:hunter2
            assert "hunter2" not in gw.log_text()


def test_sighup_reloads_every_worker(tmp_path: Path) -> None:
    with sims(2) as (a, b):
        path = tmp_path / "gw.toml"
        config = write_config(path, [{"url": a.base_url}])
        with gateway_server(
            a.base_url, "--workers", "2", env={**ENV, "VLLM_WRAPPER_CONFIG": config}
        ) as gw:
            deadline = time.monotonic() + 30
            while gw.log_text().count("Application startup complete") < 2:
                assert time.monotonic() < deadline, gw.log_text()
                time.sleep(0.1)
            write_config(path, [{"url": b.base_url}])
            gw.send_signal(signal.SIGHUP)  # to the uvicorn parent, which forwards it
            while gw.log_text().count("config reloaded") < 2:
                assert time.monotonic() < deadline + 30, gw.log_text()
                time.sleep(0.1)
            for _ in range(10):  # a new connection each, so both workers take some
                assert httpx.post(gw.url + CHAT, json=body(), timeout=30).status_code == 200
            r = httpx.post(gw.url + "/admin/reload", timeout=10)  # from loopback, auth off
            assert r.status_code == 202 and r.json()["workers"] == "all"
            assert chats(b) == 10 and chats(a) == 0
            while gw.log_text().count("config reloaded") < 4:
                assert time.monotonic() < deadline + 60, gw.log_text()
                time.sleep(0.1)
            assert "Received SIGHUP, restarting" not in gw.log_text()


def test_comma_separated_base_url_balances_replicas() -> None:
    with sims(2) as (a, b):
        with gateway_server(f"{a.base_url},{b.base_url}", env=ENV) as gw:
            health = httpx.get(gw.url + "/health", timeout=10).json()
            assert health["status"] == "healthy"
            assert [u["url"] for u in health["upstreams"]] == [a.base_url, b.base_url]
            codes = run_parallel(2, 30, lambda c: c.post(gw.url + CHAT, json=body()).status_code)
            assert codes == [200] * 60
            assert chats(a) + chats(b) == 60 and chats(a) >= 15 and chats(b) >= 15
            # One model served by both: the gateway lists it once, in vLLM's shape.
            listed = httpx.get(gw.url + "/v1/models", timeout=10).json()
            assert [m["id"] for m in listed["data"]] == [MODEL]
            assert listed["data"][0]["max_model_len"] == 4096


def test_health_follows_the_default_model(tmp_path: Path) -> None:
    with sims(2, models=[MODEL, "small"]) as (big, small):
        config = write_config(
            tmp_path / "gw.toml", [{"url": big.base_url}, {"url": small.base_url}]
        )
        with gateway(config) as gw:
            assert httpx.get(gw.url + "/health?strict=1", timeout=10).status_code == 200
            kill(big)
            r = httpx.get(gw.url + "/health?strict=1", timeout=10)
            assert r.status_code == 503  # only "small" is served: VLLM_MODEL is not
            health = r.json()
            assert health["status"] == "unhealthy" and health["vllm_available"] is False
            down = {u["url"]: u for u in health["upstreams"]}[big.base_url]
            assert down["healthy"] is False and "connect" in down["last_error"]
            r = httpx.post(gw.url + CHAT, json=body("small"), timeout=30)
            assert r.status_code == 200  # the other model is still served
