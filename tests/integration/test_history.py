"""Conversation history (SPEC §10) through real gateway processes, the simulator (which
records what it received) and a real ``redis-server``: the second turn carries the
first, across replicas and restarts; one turn at a time; keys see only their own;
history trimmed to the model's context."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from httpx_sse import connect_sse

from tests.integration.conftest import GATEWAY_ENV, MODEL, Sim
from tests.support.redis import RedisServer
from tests.support.servers import ServerProcess, gateway_server, sim_server
from tests.support.wsclient import chat_socket, collect, send, text_of

A, B = "team-a-secret", "team-b-secret"


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def write_config(tmp_path: Path, *sections: str) -> str:
    path = tmp_path / "gateway.toml"
    text = "\n".join(sections)
    if "[state]" not in text:
        text += f'\n[state]\npath = "{tmp_path / "state.db"}"\n'
    path.write_text(text)
    return str(path)


def start(upstream: str, config: str, *extra: str) -> ServerProcess:
    """The gateway, not yet started: ``with start(...) as gw`` starts and stops it."""
    return gateway_server(upstream, "--config", config, *extra, env=GATEWAY_ENV)


def turn(
    gw: ServerProcess, content: str, key: str | None = None, **extra: object
) -> httpx.Response:
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0,
        **extra,
    }
    return httpx.post(gw.url + "/chat", json=body, headers=auth(key), timeout=30)


def last_messages(sim: Sim) -> list[dict]:
    last = sim.stats()["last_request"]
    assert last["path"] == "/v1/chat/completions"
    body = orjson.loads(last["body"])
    assert "conversation_id" not in body and "store" not in body  # the gateway's own fields
    return body["messages"]


@pytest.fixture(scope="module")
def gw(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A gateway without client auth, history in SQLite."""
    server = start(sim.base_url, write_config(tmp_path_factory.mktemp("hist"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(sim: Sim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = f'[[keys]]\nname = "team-a"\nkey = "{A}"\n\n[[keys]]\nname = "team-b"\nkey = "{B}"\n'
    server = start(sim.base_url, write_config(tmp_path_factory.mktemp("keyed"), keys)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


# ---- store and continue ------------------------------------------------------------------


def test_second_turn_carries_the_first(gw: ServerProcess, clean_sim: Sim) -> None:
    first = turn(gw, "My name is Ada.", store=True)
    assert first.status_code == 200, first.text
    cid = first.json()["conversation_id"]
    assert first.headers["x-conversation-id"] == cid
    assert cid.startswith("conv_")
    answer1 = first.json()["content"]
    assert answer1

    second = turn(gw, "What is my name?", conversation_id=cid)
    assert second.status_code == 200, second.text
    assert second.json()["conversation_id"] == cid
    assert last_messages(clean_sim) == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": answer1},
        {"role": "user", "content": "What is my name?"},
    ]
    stored = httpx.get(f"{gw.url}/conversations/{cid}", timeout=10).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 2
    assert stored["messages"][3]["content"] == second.json()["content"]


def test_without_store_nothing_is_kept(gw: ServerProcess, clean_sim: Sim) -> None:
    r = turn(gw, "Hello")
    assert r.status_code == 200
    assert "conversation_id" not in r.json() and "x-conversation-id" not in r.headers
    r = turn(gw, "Hello", store=False)
    assert r.status_code == 200 and "conversation_id" not in r.json()


def test_store_false_answers_in_context_without_adding(gw: ServerProcess, clean_sim: Sim) -> None:
    cid = turn(gw, "Context.", store=True).json()["conversation_id"]
    r = turn(gw, "Just asking.", conversation_id=cid, store=False)
    assert r.status_code == 200 and r.json()["conversation_id"] == cid
    assert last_messages(clean_sim)[0] == {"role": "user", "content": "Context."}
    stored = httpx.get(f"{gw.url}/conversations/{cid}", timeout=10).json()
    assert stored["message_count"] == 2


def test_streamed_turns_carry_the_id_and_store_the_streamed_text(
    gw: ServerProcess, clean_sim: Sim
) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12}
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(
            client, "POST", gw.url + "/chat", json={**body, "stream": True, "store": True}
        ) as source,
    ):
        assert source.response.status_code == 200
        cid = source.response.headers["x-conversation-id"]
        events = [(e.event, e.data) for e in source.iter_sse()]
    text = "".join(d for e, d in events if e == "message" and d != "[DONE]")
    usage = next(orjson.loads(d) for e, d in events if e == "usage")
    assert usage["conversation_id"] == cid
    assert text

    with httpx.stream(
        "POST",
        gw.url + "/chat",
        json={
            **body,
            "messages": [{"role": "user", "content": "More."}],
            "stream": True,
            "conversation_id": cid,
        },
        timeout=30,
    ) as r:
        assert r.status_code == 200 and r.headers["x-conversation-id"] == cid
        list(r.iter_bytes())
    sent = last_messages(clean_sim)
    assert sent[:2] == [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": text},
    ]
    stored = httpx.get(f"{gw.url}/conversations/{cid}", timeout=10).json()
    assert stored["message_count"] == 4


def test_an_answer_cut_short_is_not_stored(gw: ServerProcess, clean_sim: Sim) -> None:
    cid = turn(gw, "Start.", store=True).json()["conversation_id"]
    clean_sim.faults(drop_after_chunks=2)
    body = {
        "messages": [{"role": "user", "content": "Lost."}],
        "max_tokens": 20,
        "stream": True,
        "conversation_id": cid,
    }
    with httpx.stream("POST", gw.url + "/chat", json=body, timeout=30) as r:
        raw = b"".join(r.iter_bytes())
    assert b"event: error" in raw
    stored = httpx.get(f"{gw.url}/conversations/{cid}", timeout=10).json()
    assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["Start."]
    # and the conversation is free again
    assert turn(gw, "Again.", conversation_id=cid).status_code == 200


def test_chat_ws_holds_the_same_conversations(gw: ServerProcess, clean_sim: Sim) -> None:
    """/chat/ws runs turns through the same core: store, continue, 409 in-band."""
    with chat_socket(gw.url, None) as ws:
        send(
            ws,
            type="chat",
            id=1,
            messages=[{"role": "user", "content": "Hi, I am Bo."}],
            max_tokens=5,
            store=True,
        )
        got = collect(ws, {1})[1]
        done = got[-1]
        assert done["type"] == "done", got
        cid = done["conversation_id"]
        send(
            ws,
            type="chat",
            id=2,
            messages=[{"role": "user", "content": "Who am I?"}],
            max_tokens=5,
            conversation_id=cid,
        )
        assert collect(ws, {2})[2][-1]["conversation_id"] == cid
    assert last_messages(clean_sim)[:2] == [
        {"role": "user", "content": "Hi, I am Bo."},
        {"role": "assistant", "content": text_of(got)},
    ]
    # and POST /chat continues what the socket started
    assert turn(gw, "Still me.", conversation_id=cid).status_code == 200
    stored = httpx.get(f"{gw.url}/conversations/{cid}", timeout=10).json()
    assert stored["message_count"] == 6


# ---- the conversations API ---------------------------------------------------------------


def test_create_list_get_delete(gw: ServerProcess, clean_sim: Sim) -> None:
    system = {"role": "system", "content": "You are terse."}
    r = httpx.post(
        gw.url + "/conversations",
        json={"messages": [system], "metadata": {"topic": "demo"}},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    conv = r.json()
    assert conv["object"] == "conversation" and conv["metadata"] == {"topic": "demo"}
    assert conv["messages"] == [system]
    cid = conv["id"]

    assert turn(gw, "Hi", conversation_id=cid).status_code == 200
    assert last_messages(clean_sim)[0] == system

    made = [httpx.post(gw.url + "/conversations", timeout=10).json()["id"] for _ in range(3)]
    page = httpx.get(gw.url + "/conversations", params={"limit": 2}, timeout=10).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [c["id"] for c in page["data"]] == [made[2], made[1]]
    assert "messages" not in page["data"][0]
    nxt = httpx.get(
        gw.url + "/conversations", params={"limit": 2, "after": page["last_id"]}, timeout=10
    ).json()
    assert [c["id"] for c in nxt["data"]] == [made[0], cid]

    r = httpx.delete(f"{gw.url}/conversations/{cid}", timeout=10)
    assert r.json() == {"id": cid, "object": "conversation.deleted", "deleted": True}
    assert httpx.get(f"{gw.url}/conversations/{cid}", timeout=10).status_code == 404
    assert httpx.delete(f"{gw.url}/conversations/{cid}", timeout=10).status_code == 404
    r = turn(gw, "Still there?", conversation_id=cid)
    assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found"


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"conversation_id": "conv_" + "0" * 32}, 404, "conversation_id"),
        ({"conversation_id": "not-an-id"}, 400, "conversation_id"),
        ({"conversation_id": 42}, 400, "conversation_id"),
        ({"store": "yes"}, 400, "store"),
        ({"store": True, "n": 2}, 400, "n"),
        ({"conversation_id": "conv_" + "0" * 32, "n": 2}, 400, "n"),
    ],
)
def test_bad_input_is_a_clear_4xx(gw: ServerProcess, extra: dict, status: int, param: str) -> None:
    r = turn(gw, "Hi", **extra)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/conversations", b"{nope", 400),
        ("POST", "/conversations", b'{"messages": "hi"}', 400),
        ("POST", "/conversations", b'{"metadata": {"a": 1}}', 400),
        ("POST", "/conversations", b'{"title": "x"}', 400),
        ("GET", "/conversations?limit=0", b"", 400),
        ("GET", "/conversations?after=bogus", b"", 400),
        ("GET", "/conversations/bogus", b"", 404),
        ("PUT", "/conversations", b"", 405),
        ("PATCH", "/conversations/conv_" + "0" * 32, b"", 405),
    ],
)
def test_conversations_api_bad_input(
    gw: ServerProcess, method: str, path: str, body: bytes, status: int
) -> None:
    r = httpx.request(method, gw.url + path, content=body, timeout=10)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_keys_see_only_their_own(keyed: ServerProcess, clean_sim: Sim) -> None:
    cid = turn(keyed, "Secret of team A.", key=A, store=True).json()["conversation_id"]
    mine = httpx.get(keyed.url + "/conversations", headers=auth(A), timeout=10).json()
    assert cid in [c["id"] for c in mine["data"]]
    theirs = httpx.get(keyed.url + "/conversations", headers=auth(B), timeout=10).json()
    assert cid not in [c["id"] for c in theirs["data"]]
    for r in (
        httpx.get(f"{keyed.url}/conversations/{cid}", headers=auth(B), timeout=10),
        httpx.delete(f"{keyed.url}/conversations/{cid}", headers=auth(B), timeout=10),
        turn(keyed, "Tell me A's secret.", key=B, conversation_id=cid),
    ):
        assert r.status_code == 404, r.text
    assert (
        httpx.get(f"{keyed.url}/conversations/{cid}", headers=auth(A), timeout=10).json()[
            "messages"
        ][0]["content"]
        == "Secret of team A."
    )
    assert httpx.get(keyed.url + "/conversations", timeout=10).status_code == 401


# ---- one turn at a time ------------------------------------------------------------------


def _slow_turn(gw: ServerProcess, cid: str, out: dict) -> None:
    body = {
        "messages": [{"role": "user", "content": "Slow."}],
        "max_tokens": 8,
        "stream": True,
        "conversation_id": cid,
    }
    with httpx.stream("POST", gw.url + "/chat", json=body, timeout=60) as r:
        out["status"] = r.status_code
        out["body"] = b"".join(r.iter_bytes())


def _busy_while_stalled(first: ServerProcess, second: ServerProcess, sim: Sim) -> None:
    cid = turn(first, "Begin.", store=True).json()["conversation_id"]
    sim.faults(stall_after_chunks=1, stall_seconds=3)
    out: dict = {}
    thread = threading.Thread(target=_slow_turn, args=(first, cid, out))
    thread.start()
    try:
        r = httpx.get(
            sim.url + "/_sim/wait",
            params={"field": "open_streams", "n": 1, "timeout": 20},
            timeout=30,
        )
        assert r.status_code == 200
        busy = turn(second, "Me too.", conversation_id=cid)
    finally:
        thread.join(60)
    assert out["status"] == 200 and b"[DONE]" in out["body"]
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["code"] == "conversation_busy"
    # once the first turn is over, the next one goes through
    assert turn(second, "Now?", conversation_id=cid).status_code == 200


def test_concurrent_turns_one_200_one_409(gw: ServerProcess, clean_sim: Sim) -> None:
    _busy_while_stalled(gw, gw, clean_sim)


# ---- shared storage: replicas, restarts ----------------------------------------------------


def test_replicas_share_history_and_the_lock_through_redis(
    sim: Sim, clean_sim: Sim, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, f'[state]\nredis_url = "{redis_server.url}"\n')
    with start(sim.base_url, config) as one, start(sim.base_url, config) as two:
        first = turn(one, "Remember 42.", store=True)
        cid = first.json()["conversation_id"]
        assert turn(two, "What number?", conversation_id=cid).status_code == 200
        assert last_messages(clean_sim)[1] == {
            "role": "assistant",
            "content": first.json()["content"],
        }
        _busy_while_stalled(one, two, clean_sim)


def test_a_dead_gateways_lock_expires(
    sim: Sim, clean_sim: Sim, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        "[history]\nlock_seconds = 2\n",
        f'[state]\nredis_url = "{redis_server.url}"\n',
    )
    with start(sim.base_url, config) as one, start(sim.base_url, config) as two:
        cid = turn(one, "Begin.", store=True).json()["conversation_id"]
        clean_sim.faults(stall_after_chunks=1, stall_seconds=30)
        out: dict = {}
        thread = threading.Thread(target=_slow_turn, args=(one, cid, out), daemon=True)
        thread.start()
        r = httpx.get(
            clean_sim.url + "/_sim/wait",
            params={"field": "open_streams", "n": 1, "timeout": 20},
            timeout=30,
        )
        assert r.status_code == 200
        assert turn(two, "Busy?", conversation_id=cid).status_code == 409
        assert one.proc is not None
        one.proc.send_signal(signal.SIGKILL)  # no unlock: only the expiry frees it
        thread.join(30)
        statuses = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            statuses.append(turn(two, "Free now?", conversation_id=cid).status_code)
            if statuses[-1] != 409:
                break
            time.sleep(0.5)
        assert statuses[-1] == 200, statuses


def test_history_survives_a_restart_in_sqlite(sim: Sim, clean_sim: Sim, tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[history]\npath = "{tmp_path / "history.db"}"\n')
    with start(sim.base_url, config) as gw:
        first = turn(gw, "Before the restart.", store=True)
        cid = first.json()["conversation_id"]
    assert (tmp_path / "history.db").exists()
    with start(sim.base_url, config) as gw:
        assert turn(gw, "After.", conversation_id=cid).status_code == 200
    assert last_messages(clean_sim)[:2] == [
        {"role": "user", "content": "Before the restart."},
        {"role": "assistant", "content": first.json()["content"]},
    ]


def test_workers_share_history_through_the_sqlite_file(
    sim: Sim, clean_sim: Sim, tmp_path: Path
) -> None:
    """With --workers 2 a turn lands on either worker (a new connection each time)."""
    with start(sim.base_url, write_config(tmp_path), "--workers", "2") as gw:
        cid = turn(gw, "Turn 0.", store=True).json()["conversation_id"]
        for i in range(1, 6):
            r = turn(gw, f"Turn {i}.", conversation_id=cid)
            assert r.status_code == 200, r.text
            users = [m["content"] for m in last_messages(clean_sim) if m["role"] == "user"]
            assert users == [f"Turn {n}." for n in range(i + 1)]


def test_retention_expires_conversations_and_bounds_their_messages(
    sim: Sim, clean_sim: Sim, tmp_path: Path
) -> None:
    config = write_config(tmp_path, "[history]\nttl_days = 0.00005\nmax_messages = 5\n")  # 4.3 s
    with start(sim.base_url, config) as gw:
        system = {"role": "system", "content": "Be brief."}
        conv = httpx.post(gw.url + "/conversations", json={"messages": [system]}).json()
        for i in range(4):
            assert turn(gw, f"Turn {i}.", conversation_id=conv["id"]).status_code == 200
        stored = httpx.get(f"{gw.url}/conversations/{conv['id']}", timeout=10).json()
        assert stored["messages"][0] == system  # the system message stays...
        assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == [
            "Turn 2.",
            "Turn 3.",
        ]  # ...and whole oldest turns go beyond max_messages
        deadline = time.monotonic() + 30
        status = 200
        while status == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            status = httpx.get(f"{gw.url}/conversations/{conv['id']}", timeout=10).status_code
        assert status == 404
        listed = httpx.get(gw.url + "/conversations", timeout=10).json()
        assert conv["id"] not in [c["id"] for c in listed["data"]]


# ---- trimming ----------------------------------------------------------------------------


def test_history_is_trimmed_to_a_small_context(tmp_path: Path) -> None:
    """A 256-token model and turns of ~70 tokens (question and answer): every turn
    succeeds, the system message stays, the oldest turns go, what the upstream got fits."""
    with sim_server("--model", MODEL, "--max-model-len", "256") as server:
        small = Sim(server)
        with start(small.base_url, write_config(tmp_path)) as gw:
            system = {"role": "system", "content": "You answer briefly."}
            conv = httpx.post(
                gw.url + "/conversations", json={"messages": [system]}, timeout=10
            ).json()
            words = " ".join(f"w{i}" for i in range(15))  # 33 tokens in the simulator
            for i in range(12):
                r = turn(gw, f"Turn {i}: {words}", conversation_id=conv["id"], max_tokens=32)
                assert r.status_code == 200, (i, r.text)
                assert r.json()["usage"]["prompt_tokens"] + 32 <= 256
            sent = last_messages(small)
            assert sent[0] == system
            assert sent[-1]["content"].startswith("Turn 11:")
            assert not any(m["content"].startswith("Turn 0:") for m in sent)
            assert len(sent) > 2  # not everything was dropped: recent turns stay
            stored = httpx.get(f"{gw.url}/conversations/{conv['id']}", timeout=10).json()
            assert stored["message_count"] == 1 + 2 * 12  # storage keeps all (max_messages)


def test_the_docs_describe_the_real_answers(gw: ServerProcess, clean_sim: Sim) -> None:
    schema = httpx.get(gw.url + "/openapi.json", timeout=10).json()
    paths = schema["paths"]
    assert {"post", "get"} <= set(paths["/conversations"])
    assert {"get", "delete"} <= set(paths["/conversations/{conversation_id}"])
    assert {"404", "409"} <= set(paths["/chat"]["post"]["responses"])
    created = paths["/conversations"]["post"]["responses"]["200"]["content"]["application/json"]
    real = httpx.post(gw.url + "/conversations", json={"messages": [], "metadata": {}}).json()
    assert set(real) == set(created["example"])
    chat = schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"conversation_id", "store"} <= set(chat)
    html = httpx.get(gw.url + "/docs", timeout=10)
    assert html.status_code == 200
