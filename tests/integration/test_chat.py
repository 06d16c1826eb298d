"""/chat against the simulator: exact streamed text, bad input, upstream errors, faults."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
from httpx_sse import connect_sse

from tests.integration.conftest import GATEWAY_ENV, MODEL, Sim
from tests.support.servers import ServerProcess, gateway_server

POEM = {"messages": [{"role": "user", "content": "write a short poem"}], "temperature": 0}
HI = [{"role": "user", "content": "Hello! How are you?"}]


def chat(gateway: ServerProcess, body: object, **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gateway.url + "/chat", content=content, timeout=30, **kw)


def sse_events(gateway: ServerProcess, body: dict) -> list[tuple[str, str]]:
    with httpx.Client(timeout=30) as client:
        with connect_sse(client, "POST", gateway.url + "/chat", json=body) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            return [(e.event, e.data) for e in source.iter_sse()]


def assert_serves(gateway: ServerProcess) -> None:
    r = chat(gateway, {"messages": HI, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["content"]


def test_multiline_text_round_trips_exactly_through_an_sse_parser(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    whole = chat(gateway, POEM).json()
    assert "\n" in whole["content"]  # a poem: several lines
    events = sse_events(gateway, {**POEM, "stream": True})
    assert events[-1] == ("message", "[DONE]")
    text = "".join(data for kind, data in events[:-1] if kind == "message")
    assert text == whole["content"]
    (usage,) = [orjson.loads(data) for kind, data in events if kind == "usage"]
    assert usage == {**whole["usage"], "finish_reason": "stop", "model": MODEL}


def test_defaults_and_pass_through_fields_reach_vllm(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    r = chat(gateway, {"messages": HI, "seed": 5, "top_p": 0.5, "stop": ["zzz"]})
    assert r.status_code == 200
    sent = orjson.loads(clean_sim.stats()["last_request"]["body"])
    assert sent["model"] == MODEL
    assert (sent["max_tokens"], sent["temperature"]) == (2048, 0.7)  # the guide's defaults
    assert (sent["seed"], sent["top_p"], sent["stop"]) == (5, 0.5, ["zzz"])
    assert sent["stream"] is False and "stream_options" not in sent


def test_max_tokens_limits_the_answer(gateway: ServerProcess, clean_sim: Sim) -> None:
    answer = chat(gateway, {"messages": HI, "max_tokens": 3}).json()
    assert answer["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3


BAD = [
    (b"{not json", "body"),
    ({"max_tokens": 5}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "temperature": 2.5}, "temperature"),
    ({"messages": HI, "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
def test_bad_input_is_400_naming_the_field(
    gateway: ServerProcess, clean_sim: Sim, body: object, param: str
) -> None:
    r = chat(gateway, body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert clean_sim.receipts(None) == 0  # never sent upstream
    assert_serves(gateway)


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_keep_their_status_and_message(
    gateway: ServerProcess, clean_sim: Sim, stream: bool
) -> None:
    r = chat(gateway, {"messages": HI, "max_tokens": 99999, "stream": stream})
    assert r.status_code == 400
    assert "max_tokens=99999 cannot be greater than max_model_len" in r.json()["error"]["message"]
    r = chat(gateway, {"messages": HI, "model": "no-such-model", "stream": stream})
    assert r.status_code == 404
    assert "no-such-model" in r.json()["error"]["message"]
    clean_sim.faults(fail_next=1, status=500)
    r = chat(gateway, {"messages": HI, "stream": stream})
    assert r.status_code == 500 and r.json()["error"]["message"]
    assert_serves(gateway)


def test_same_retry_policy_as_v1(gateway: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(fail_next=2, status=503)
    assert_serves(gateway)
    assert clean_sim.receipts(None) == 3
    clean_sim.faults(fail_next=10, status=503)
    r = chat(gateway, {"messages": HI})
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"


def test_stream_is_delivered_while_the_upstream_is_still_generating(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    # The upstream pauses after 4 events; the client must already hold text by then.
    # (5 s: long enough that a busy CI machine cannot finish the stream before the
    # client's first read, which a 2 s pause once allowed.)
    clean_sim.faults(stall_after_chunks=4, stall_seconds=5)
    with httpx.Client(timeout=30) as client:
        with connect_sse(client, "POST", gateway.url + "/chat", json={**POEM, "stream": True}) as s:
            events = s.iter_sse()  # one iterator: dropping it would close the response
            first = next(events)
            assert first.event == "message" and first.data
            stats = clean_sim.stats()
            assert stats["open_streams"] == 1 and stats["completed"] == 0, stats
            rest = list(events)
    assert rest[-1].data == "[DONE]"


def test_client_disconnect_aborts_the_generation(gateway: ServerProcess, clean_sim: Sim) -> None:
    clean_sim.faults(stall_after_chunks=3, stall_seconds=10)
    with httpx.Client(timeout=30) as client:
        with connect_sse(client, "POST", gateway.url + "/chat", json={**POEM, "stream": True}) as s:
            next(s.iter_sse())
    assert clean_sim.wait_aborted(1)["aborted"] >= 1
    assert_serves(gateway)


def error_event(events: list[tuple[str, str]]) -> dict:
    assert events[-1][0] == "error", events[-3:]
    assert ("message", "[DONE]") not in events
    return orjson.loads(events[-1][1])["error"]


def test_upstream_drop_mid_stream_ends_with_an_error_event(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(drop_after_chunks=4)
    events = sse_events(gateway, {**POEM, "stream": True})
    assert [kind for kind, _ in events[:-1]] == ["message"] * (len(events) - 1)
    error = error_event(events)
    assert error["code"] == "upstream_unavailable" and error["message"]
    assert_serves(gateway)


def test_garbage_from_upstream_ends_with_an_error_event(
    gateway: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(garbage=True)
    error = error_event(sse_events(gateway, {**POEM, "stream": True}))
    assert error["code"] in ("upstream_protocol_error", "upstream_stream_incomplete")
    assert_serves(gateway)


@pytest.fixture(scope="module")
def impatient_gateway(sim: Sim) -> Iterator[ServerProcess]:
    with gateway_server(sim.base_url, env={**GATEWAY_ENV, "VLLM_TIMEOUT": "0.5"}) as server:
        yield server


def test_upstream_stall_beyond_timeout_ends_with_an_error_event(
    impatient_gateway: ServerProcess, clean_sim: Sim
) -> None:
    clean_sim.faults(stall_after_chunks=4, stall_seconds=3)
    events = sse_events(impatient_gateway, {**POEM, "stream": True})
    error = error_event(events)
    assert error["code"] == "upstream_timeout"
    assert len(events) > 1  # text came first, then the error
    assert clean_sim.wait_aborted(1)["aborted"] >= 1  # the stalled generation was closed
    assert_serves(impatient_gateway)
