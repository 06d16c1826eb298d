"""``/chat/ws`` against real processes with the ``websockets`` client (SPEC §11)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.integration.conftest import GATEWAY_ENV, KEY, MODEL, Sim
from tests.support.procfs import open_fds, rss_bytes
from tests.support.servers import ServerProcess, free_port, gateway_server, sim_server
from tests.support.wsclient import (
    StalledClient,
    chat_socket,
    collect,
    next_message,
    send,
    text_of,
    ws_url,
)

HI = [{"role": "user", "content": "Hello! How are you?"}]
POEM = [{"role": "user", "content": "write a short poem"}]
ALLOWED = "http://app.example"
WS_ENV = {
    **GATEWAY_ENV,
    "VLLM_WRAPPER_API_KEY": KEY,
    "VLLM_WRAPPER_CORS_ORIGINS": ALLOWED,
    "VLLM_WRAPPER_WS_AUTH_TIMEOUT": "1",
    "VLLM_WRAPPER_WS_MAX_REQUESTS": "3",
    "VLLM_WRAPPER_WS_PING_INTERVAL": "0.5",
    "VLLM_WRAPPER_MAX_BODY_BYTES": "65536",
}


@pytest.fixture(scope="module")
def gw(sim: Sim) -> Iterator[ServerProcess]:
    with gateway_server(sim.base_url, env=WS_ENV) as server:
        yield server


def whole_answer(gw: ServerProcess, body: dict) -> dict:
    r = httpx.post(
        gw.url + "/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()


def assert_socket_serves(gw: ServerProcess) -> None:
    with chat_socket(gw.url, KEY) as ws:
        send(ws, type="chat", id="check", messages=HI, max_tokens=3)
        assert collect(ws, {"check"})["check"][-1]["type"] == "done"


# ---- the protocol ------------------------------------------------------------------------


def test_many_turns_on_one_socket_match_post_chat(gw: ServerProcess, clean_sim: Sim) -> None:
    with chat_socket(gw.url, KEY) as ws:
        for n, messages in enumerate([POEM, HI, POEM]):
            expected = whole_answer(gw, {"messages": messages, "temperature": 0, "max_tokens": 40})
            send(ws, type="chat", id=n, messages=messages, temperature=0, max_tokens=40)
            got = collect(ws, {n})[n]
            deltas = [m for m in got if m["type"] == "delta"]
            assert len(deltas) > 3  # streamed in pieces
            assert text_of(got) == expected["content"]
            done = got[-1]
            assert done == {
                "type": "done",
                "id": n,
                "usage": expected["usage"],
                "finish_reason": expected["finish_reason"],
                "model": MODEL,
            }
    sent = orjson.loads(clean_sim.stats()["last_request"]["body"])
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_concurrent_ids_on_one_socket(gw: ServerProcess, clean_sim: Sim) -> None:
    # Each stream pauses after 3 events: every id must have text before any one ends.
    clean_sim.faults(stall_after_chunks=3, stall_seconds=1, count=3)
    ids = {"a", "b", "c"}
    arrived: list[dict] = []
    with chat_socket(gw.url, KEY) as ws:
        for i in sorted(ids):
            send(ws, type="chat", id=i, messages=POEM, temperature=0, max_tokens=30)
        ended: set[str] = set()
        while ended != ids and len(arrived) < 1000:
            message = next_message(ws)
            arrived.append(message)
            if message["type"] in ("done", "error"):
                ended.add(message["id"])
    assert {m["id"] for m in arrived if m["type"] == "done"} == ids
    texts = {i: text_of([m for m in arrived if m["id"] == i]) for i in ids}
    assert len(set(texts.values())) == 1 and texts["a"]  # same prompt, same answer
    first_done = next(n for n, m in enumerate(arrived) if m["type"] == "done")
    assert {m["id"] for m in arrived[:first_done]} == ids
    assert clean_sim.stats()["completed"] == 3


def test_cap_on_requests_per_socket(gw: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(stall_after_chunks=1, stall_seconds=2, count=3)
    with chat_socket(gw.url, KEY) as ws:
        for i in range(4):
            send(ws, type="chat", id=i, messages=HI, max_tokens=5)
        got = collect(ws, {0, 1, 2, 3})
    assert got[3] == [
        {
            "type": "error",
            "id": 3,
            "status": 400,
            "error": {
                "message": got[3][0]["error"]["message"],
                "type": "invalid_request_error",
                "param": None,
                "code": "too_many_requests",
            },
        }
    ]
    assert "VLLM_WRAPPER_WS_MAX_REQUESTS" in got[3][0]["error"]["message"]
    assert all(got[i][-1]["type"] == "done" for i in range(3))


def test_cancel_closes_the_upstream_and_the_socket_goes_on(
    gw: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(stall_after_chunks=3, stall_seconds=10)
    with chat_socket(gw.url, KEY) as ws:
        send(ws, type="chat", id="long", messages=POEM, max_tokens=200)
        assert next_message(ws)["type"] == "delta"
        send(ws, type="cancel", id="long")
        got = collect(ws, {"long"})["long"]
        assert got[-1] == {
            "type": "done",
            "id": "long",
            "usage": None,
            "finish_reason": "cancelled",
            "model": MODEL,
        }
        stats = clean_sim.wait_aborted(1, timeout=5)
        assert stats["aborted"] == 1 and stats["open_streams"] == 0
        send(ws, type="cancel", id="long")  # over already
        error = next_message(ws)
        assert (error["type"], error["id"], error["error"]["code"]) == (
            "error",
            "long",
            "not_running",
        )
        send(ws, type="chat", id="next", messages=HI, max_tokens=4)
        assert collect(ws, {"next"})["next"][-1]["finish_reason"] == "length"


def test_closing_the_socket_mid_answer_aborts_the_generation(
    gw: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(stall_after_chunks=3, stall_seconds=10, count=2)
    with chat_socket(gw.url, KEY) as ws:
        send(ws, type="chat", id=1, messages=POEM, max_tokens=200)
        send(ws, type="chat", id=2, messages=POEM, max_tokens=200)
        seen = set()
        while seen != {1, 2}:
            seen.add(next_message(ws)["id"])
    stats = clean_sim.wait_aborted(2, timeout=5)
    assert stats["aborted"] == 2 and stats["open_streams"] == 0
    assert_socket_serves(gw)


def test_upstream_errors_and_bad_fields_are_error_messages(
    gw: ServerProcess, clean_sim: Sim
) -> None:
    with chat_socket(gw.url, KEY) as ws:
        send(ws, type="chat", id="v", messages=HI, temperature=9)
        (bad,) = collect(ws, {"v"})["v"]
        assert bad["status"] == 400 and bad["error"]["param"] == "temperature"
        send(ws, type="chat", id="m", messages=HI, model="no-such-model")
        (missing,) = collect(ws, {"m"})["m"]
        assert missing["status"] == 404 and "no-such-model" in missing["error"]["message"]
        clean_sim.faults(drop_after_chunks=4)
        send(ws, type="chat", id="d", messages=POEM, max_tokens=100)
        dropped = collect(ws, {"d"})["d"]
        assert [m["type"] for m in dropped[:-1]] == ["delta"] * (len(dropped) - 1)
        assert dropped[-1]["type"] == "error"
        assert dropped[-1]["error"]["code"] == "upstream_unavailable"
        send(ws, type="chat", id="ok", messages=HI, max_tokens=3)
        assert collect(ws, {"ok"})["ok"][-1]["type"] == "done"
    assert clean_sim.receipts(None) == 3  # the 400 never went upstream


def test_retries_as_post_chat(gw: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(fail_next=2, status=503)
    with chat_socket(gw.url, KEY) as ws:
        send(ws, type="chat", id=1, messages=HI, max_tokens=3)
        assert collect(ws, {1})[1][-1]["type"] == "done"
    assert clean_sim.receipts(None) == 3


BAD_MESSAGES = [
    ("{not json", None, "invalid_json"),
    ("[1, 2]", None, "invalid_json"),
    ('{"type": "shout", "id": "x"}', "x", "unknown_type"),
    ('{"type": "chat", "id": {"a": 1}, "messages": []}', None, "invalid_id"),
    ('{"type": "chat", "id": "e"}', "e", "missing_required_parameter"),
    ('{"type": "chat", "id": "x" , "messages": "' + "a" * 70000 + '"}', None, "payload_too_large"),
]


def test_bad_messages_get_an_error_and_the_socket_stays_open(
    gw: ServerProcess, clean_sim: Sim
) -> None:
    with chat_socket(gw.url, KEY) as ws:
        for raw, turn_id, code in BAD_MESSAGES:
            ws.send(raw)
            error = next_message(ws)
            assert (error["type"], error["id"], error["error"]["code"]) == ("error", turn_id, code)
        ws.send(b'{"type": "ping"}')  # a binary frame with JSON works too
        assert next_message(ws) == {"type": "pong"}
        send(ws, type="chat", id="fine", messages=HI, max_tokens=3)
        assert collect(ws, {"fine"})["fine"][-1]["type"] == "done"
    assert clean_sim.receipts(None) == 1


def test_idle_socket_gets_keepalive_pings(gw: ServerProcess) -> None:
    with chat_socket(gw.url, KEY) as ws:
        assert next_message(ws, timeout=5, pings=True) == {"type": "ping"}
        assert next_message(ws, timeout=5, pings=True) == {"type": "ping"}


def test_plain_http_get_is_426_with_a_hint(gw: ServerProcess) -> None:
    r = httpx.get(gw.url + "/chat/ws", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 426
    assert r.json()["error"]["code"] == "upgrade_required"


# ---- auth and origins ----------------------------------------------------------------


def test_wrong_key_header_is_http_401_before_the_upgrade(gw: ServerProcess) -> None:
    for value in ("Bearer wrong", "Basic abc"):
        with pytest.raises(InvalidStatus) as caught:
            connect(ws_url(gw.url), additional_headers={"Authorization": value}, open_timeout=10)
        response = caught.value.response
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert json.loads(response.body)["error"]["type"] == "authentication_error"
        assert KEY.encode() not in response.body


def test_auth_message_for_browsers(gw: ServerProcess) -> None:
    with chat_socket(gw.url, ready=False) as ws:
        send(ws, type="auth", api_key=KEY)
        assert next_message(ws) == {"type": "ready"}
        send(ws, type="chat", id=1, messages=HI, max_tokens=3)
        assert collect(ws, {1})[1][-1]["type"] == "done"


@pytest.mark.parametrize(
    "first",
    [
        {"type": "auth", "api_key": "wrong"},
        {"type": "chat", "id": 1, "messages": HI},
        None,  # says nothing: the auth timeout (1 s here) closes it
    ],
)
def test_no_valid_auth_message_closes_1008(gw: ServerProcess, first: dict | None) -> None:
    with chat_socket(gw.url, ready=False) as ws:
        if first is not None:
            send(ws, **first)
        error = next_message(ws, timeout=10)
        assert error["type"] == "error" and error["status"] == 401
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=10)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1008


def test_origins_are_checked(gw: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(InvalidStatus) as caught:
        connect(ws_url(gw.url), additional_headers=headers, origin="http://evil.example")
    assert caught.value.response.status_code == 403
    assert b"VLLM_WRAPPER_CORS_ORIGINS" in caught.value.response.body
    for origin in (ALLOWED, gw.url):  # an allowed origin, and the gateway's own page
        with connect(ws_url(gw.url), additional_headers=headers, origin=origin) as ws:
            assert next_message(ws) == {"type": "ready"}


# ---- a client that stops reading; many sockets ------------------------------------------


@pytest.fixture(scope="module")
def endless_sim() -> Iterator[Sim]:
    """A simulator that answers with as many tokens as asked (up to 400k)."""
    with sim_server("--model", MODEL, "--tokens", "400000", "--max-model-len", "500000") as s:
        yield Sim(s)


def test_slow_reader_is_closed_and_costs_bounded_memory(endless_sim: Sim) -> None:
    env = {**GATEWAY_ENV, "VLLM_WRAPPER_WS_SEND_TIMEOUT": "1"}
    with gateway_server(endless_sim.base_url, env=env) as gw:
        rss_before = rss_bytes(gw.proc.pid)
        client = StalledClient(gw.url)
        try:
            for i in range(3):  # ~20 MB of deltas each, far beyond the socket buffers
                client.send(type="chat", id=i, messages=HI, max_tokens=300000)
            # The sends block, the send timeout closes the socket, the upstreams are closed.
            stats = endless_sim.wait_aborted(3, timeout=60)
            assert stats["aborted"] == 3 and stats["completed"] == 0, stats
            assert stats["open_streams"] == 0
            rss_peak = rss_bytes(gw.proc.pid)
        finally:
            client.close()
        assert rss_peak - rss_before < 30 * 2**20
        assert "read nothing for 1s" in gw.log_text()
        assert_socket_serves_without_key(gw)


def assert_socket_serves_without_key(gw: ServerProcess) -> None:
    with chat_socket(gw.url) as ws:
        send(ws, type="chat", id=1, messages=HI, max_tokens=3)
        assert collect(ws, {1})[1][-1]["type"] == "done"


def test_200_sockets_at_once_then_fds_and_memory_back(gw: ServerProcess) -> None:
    pid = gw.proc.pid
    assert_socket_serves(gw)  # warm
    fds_before, rss_before = open_fds(pid), rss_bytes(pid)
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(
                connect(ws_url(gw.url), additional_headers={"Authorization": f"Bearer {KEY}"})
            )
            for _ in range(200)
        ]
        for ws in sockets:
            assert next_message(ws) == {"type": "ready"}
        assert open_fds(pid) >= fds_before + 200
        for n, ws in enumerate(sockets[:20]):  # some of them chat while all are open
            send(ws, type="chat", id=n, messages=HI, max_tokens=3)
        for n, ws in enumerate(sockets[:20]):
            assert collect(ws, {n})[n][-1]["type"] == "done"
    deadline = time.monotonic() + 20
    while open_fds(pid) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(pid) <= fds_before + 2
    assert rss_bytes(pid) - rss_before < 30 * 2**20


# ---- another server ------------------------------------------------------------------


SERVERS = {
    "hypercorn": ["-m", "hypercorn", "proxy:create_app()", "--bind", "127.0.0.1:{port}"],
    "uvicorn-wsproto": [
        *("-m", "uvicorn", "proxy:create_app", "--factory", "--ws", "wsproto"),
        *("--host", "127.0.0.1", "--port", "{port}"),
    ],
}


@pytest.mark.parametrize("server", SERVERS)
def test_under_other_servers(sim: Sim, clean_sim: Sim, server: str) -> None:
    port = free_port()
    args = [sys.executable, *(a.format(port=port) for a in SERVERS[server])]
    env = {
        **GATEWAY_ENV,
        "VLLM_BASE_URL": sim.base_url,
        "VLLM_WRAPPER_ENV_FILE": "",
        "VLLM_WRAPPER_API_KEY": KEY,
    }
    with ServerProcess(args, port=port, env=env, name=server) as s:
        with pytest.raises(InvalidStatus) as caught:
            connect(ws_url(s.url), additional_headers={"Authorization": "Bearer nope"})
        assert caught.value.response.status_code == 401
        clean_sim.faults(stall_after_chunks=3, stall_seconds=10)
        with chat_socket(s.url, KEY) as ws:
            send(ws, type="chat", id=1, messages=POEM, max_tokens=200)
            assert next_message(ws)["type"] == "delta"
            send(ws, type="cancel", id=1)
            assert collect(ws, {1})[1][-1]["finish_reason"] == "cancelled"
            assert clean_sim.wait_aborted(1)["aborted"] == 1
            send(ws, type="chat", id=2, messages=HI, max_tokens=4)
            assert collect(ws, {2})[2][-1]["type"] == "done"


# ---- the README's snippets, as written -------------------------------------------------

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def readme_block(language: str, marker: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_python_snippet_runs_as_written(auth_gateway: ServerProcess) -> None:
    code = readme_block("python", "websockets.sync.client")
    code = code.replace("localhost:8001", auth_gateway.url.removeprefix("http://"))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    text, _, last = done.stdout.rpartition("\n ")
    assert text.strip() and "'type': 'done'" in last and "'finish_reason': 'stop'" in last
