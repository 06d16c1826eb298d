"""The simulated vLLM as a real server process on loopback.

Shapes are checked against vLLM 0.32's recorded transcripts; usage, faults,
abort detection and the API key against their documented behaviour. Waits
are on events (``/_sim/wait_aborted``), not sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from tests.support.servers import ServerProcess, sim_server
from tests.support.wire import shape
from tests.unit.test_sim_wire import REFERENCE, load_transcript

KEY = "sk-test-123"
ALIAS = "meta-llama/Llama-3.1-70B-Instruct"
HELLO = [{"role": "user", "content": "Hello! How are you?"}]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sim() -> Iterator[ServerProcess]:
    # the recordings were made against a vLLM serving only tiny-llama
    with sim_server("--max-model-len", "512", "--model", "tiny-llama") as server:
        yield server


@pytest.fixture(scope="module")
def keyed() -> Iterator[ServerProcess]:
    with sim_server(
        "--max-model-len", "512", "--api-key", KEY, "--model", f"tiny-llama,{ALIAS}"
    ) as s:
        yield s


@pytest.fixture
def client(sim: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as c:
        assert c.post("/_sim/reset").json() == {"ok": True}
        yield c


def chat(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "tiny-llama", **body})


def sse_events(response: httpx.Response) -> list[bytes]:
    body = response.read()
    assert body.endswith(b"\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events)
    return [e[6:] for e in events]


def stream_content(events: list[bytes]) -> tuple[str, int, str | None, dict | None]:
    """(text, number of content chunks, finish_reason, usage) of a chat stream."""
    text, chunks, finish, usage = "", 0, None, None
    for event in events[:-1]:
        data = orjson.loads(event)
        if data.get("usage"):
            usage = data["usage"]
        for choice in data["choices"]:
            delta = choice["delta"]
            if "role" in delta:
                continue
            text += delta["content"]
            chunks += 1
            finish = choice["finish_reason"] or finish
    return text, chunks, finish, usage


# -- the recorded transcripts, replayed -------------------------------------------

REPLAY = [
    "01_health.txt",
    "02_models.txt",
    "03_chat_nonstream.txt",
    "04_chat_stream.txt",
    "05_chat_stream_usage.txt",
    "06_completions_nonstream.txt",
    "07_completions_stream.txt",
    "07b_completions_stream_usage.txt",
    "08_unknown_model.txt",
    "08b_unknown_model_stream.txt",
    "09_malformed_json.txt",
    "10_max_tokens_too_large.txt",
    "10b_max_tokens_too_large_stream.txt",
    "10c_completions_max_tokens_too_large.txt",
    "10d_prompt_plus_max_tokens_over_ctx.txt",
    "10e_max_completion_tokens.txt",
    "10f_max_tokens_zero.txt",
    "11_missing_messages.txt",
    "12_wrong_type.txt",
    "13_no_model_field.txt",
    "14_unknown_path.txt",
    "15_wrong_method.txt",
    "16_version.txt",
    "17_chat_n2_stream.txt",
    "17b_chat_n2_stream_sampled.txt",
    "18_chat_logprobs.txt",
    "19_prompt_too_long.txt",
    "20_stop_sequence.txt",
    "22_post_empty_body_no_content_type.txt",
    "23_tokenize.txt",
]
KEYED_REPLAY = [
    "30_apikey_health_noauth.txt",
    "31_apikey_models_noauth.txt",
    "32_apikey_models_wrongkey.txt",
    "33_apikey_models_goodkey.txt",
    "34_apikey_chat_noauth.txt",
    "35_apikey_chat_goodkey_stream.txt",
    "36_apikey_basic_scheme.txt",
    "37_apikey_lowercase_bearer.txt",
    "38_apikey_metrics_noauth.txt",
    "39_apikey_version_noauth.txt",
    "40_apikey_tokenize_noauth.txt",
]


def replay(server: ServerProcess, name: str) -> None:
    t = load_transcript(name)
    headers = dict(t.request_headers)
    if t.request_body is not None and not headers:
        headers["Content-Type"] = "application/json"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.request(t.method, t.path, content=t.request_body, headers=headers)
        body = r.read()
    assert r.status_code == t.status
    got = [(k.decode().lower(), v.decode()) for k, v in r.headers.raw]
    assert [k for k, _ in got] == [k for k, _ in t.headers]
    for (k, mine), (_, theirs) in zip(got, t.headers, strict=True):
        if k in ("server", "content-type", "vary", "allow", "transfer-encoding"):
            assert mine == theirs, k
    if t.status >= 400 or t.path in ("/health", "/version"):
        assert body == t.body
    elif r.headers["content-type"].startswith("text/event-stream"):
        ours = [e[6:] for e in body.split(b"\n\n") if e]
        theirs = t.events()
        assert ours[-1] == b"[DONE]"
        mine_shapes = [shape(orjson.loads(e)) for e in ours[:-1]]
        their_shapes = [shape(orjson.loads(e)) for e in theirs[:-1]]
        if orjson.loads(t.request_body or b"{}").get("n", 1) > 1:
            # vLLM interleaves choices as they are generated: compare as multisets
            mine_shapes, their_shapes = (
                sorted(map(repr, mine_shapes)),
                sorted(map(repr, their_shapes)),
            )
        assert mine_shapes == their_shapes
    elif t.path == "/metrics":
        assert b"vllm:generation_tokens_total" in body
    else:
        mine, theirs = orjson.loads(body), orjson.loads(t.body)
        if t.path == "/v1/models":  # the keyed server serves an extra alias
            mine["data"] = mine["data"][:1]
        assert shape(mine) == shape(theirs)


@pytest.mark.parametrize("name", REPLAY)
def test_replay_transcript(sim: ServerProcess, name: str) -> None:
    replay(sim, name)


@pytest.mark.parametrize("name", KEYED_REPLAY)
def test_replay_api_key_transcript(keyed: ServerProcess, name: str) -> None:
    replay(keyed, name)


def test_reference_present_or_skipped() -> None:
    assert REFERENCE is None or (REFERENCE / "04_chat_stream.txt").is_file()


# -- text and usage ---------------------------------------------------------------


def test_natural_answer_and_usage(client: httpx.Client) -> None:
    r = chat(client, messages=HELLO, temperature=0)
    data = r.json()
    choice = data["choices"][0]
    assert data["id"].startswith("chatcmpl-") and len(data["id"]) == len("chatcmpl-") + 16
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert choice["message"]["content"].startswith('You asked about "Hello! How are you')
    usage = data["usage"]
    assert 30 <= usage["completion_tokens"] <= 60
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    tok = client.post("/tokenize", json={"model": "tiny-llama", "messages": HELLO}).json()
    assert usage["prompt_tokens"] == tok["count"]


@pytest.mark.parametrize(
    "content",
    [
        "Hello! How are you?",
        "Write a poem about autumn",
        "写一首关于月亮的诗",
        "Show me Python code",
    ],
)
def test_stream_and_unary_agree(client: httpx.Client, content: str) -> None:
    messages = [{"role": "user", "content": content}]
    unary = chat(client, messages=messages, temperature=0).json()
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": messages,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        text, chunks, finish, usage = stream_content(sse_events(r))
    assert text == unary["choices"][0]["message"]["content"]
    assert finish == unary["choices"][0]["finish_reason"] == "stop"
    assert usage is not None
    assert chunks == usage["completion_tokens"] == unary["usage"]["completion_tokens"]
    assert usage["prompt_tokens"] == unary["usage"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + chunks


def test_multi_line_answer_streams_newlines(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a poem please"}], "stream": True},
    ) as r:
        text, *_ = stream_content(sse_events(r))
    assert text.count("\n") >= 4


def test_max_tokens_and_length(client: httpx.Client) -> None:
    data = chat(client, messages=HELLO, max_tokens=7).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 7


def test_ignore_eos_and_header_forced_tokens(client: httpx.Client) -> None:
    data = chat(client, messages=HELLO, max_tokens=100, ignore_eos=True).json()
    assert data["usage"]["completion_tokens"] == 100
    assert data["choices"][0]["finish_reason"] == "length"
    r = client.post(
        "/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 300, "stream": True},
        headers={"x-sim-tokens": "120"},
    )
    text, chunks, finish, _ = stream_content(sse_events(r))
    assert chunks == 120 and finish == "stop" and text


def test_stop_string_in_stream(client: httpx.Client) -> None:
    r = chat(client, messages=HELLO, temperature=0, stream=True, stop=["about"])
    events = sse_events(r)
    text, _, finish, _ = stream_content(events)
    assert text == "You asked "
    assert finish == "stop"
    last = orjson.loads(events[-2])["choices"][0]
    assert last["stop_reason"] == "about"


def test_n_choices_interleave(client: httpx.Client) -> None:
    r = chat(client, messages=HELLO, temperature=1, seed=3, n=3, max_tokens=4, stream=True)
    indexes = [orjson.loads(e)["choices"][0]["index"] for e in sse_events(r)[:-1]]
    assert indexes[:3] == [0, 1, 2]  # role chunks first
    assert sorted(indexes[3:]) == [0] * 4 + [1] * 4 + [2] * 4
    unary = chat(client, messages=HELLO, temperature=1, seed=3, n=2, max_tokens=5).json()
    assert [c["index"] for c in unary["choices"]] == [0, 1]
    assert unary["usage"]["completion_tokens"] == 10


def test_completions_prompt_list(client: httpx.Client) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "model": "tiny-llama",
            "prompt": ["Once upon a time", "def add(a, b):"],
            "max_tokens": 20,
        },
    )
    data = r.json()
    assert data["id"].startswith("cmpl-")
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert "\n" in data["choices"][1]["text"]
    assert data["usage"]["prompt_tokens"] == 4 + 8


def test_embeddings(client: httpx.Client) -> None:
    body = {"model": "tiny-llama", "input": ["the cat sat", "the cat sat", "stock markets fell"]}
    data = client.post("/v1/embeddings", json=body).json()
    vecs = [d["embedding"] for d in data["data"]]
    assert data["object"] == "list" and data["data"][0]["object"] == "embedding"
    assert len(vecs[0]) == 32 and vecs[0] == vecs[1] != vecs[2]
    assert abs(sum(x * x for x in vecs[0]) - 1) < 1e-3
    assert data["usage"]["prompt_tokens"] == 9 and data["usage"]["completion_tokens"] == 0


# -- the OpenAI SDK -----------------------------------------------------------------


def test_openai_sdk_parses_everything(sim: ServerProcess) -> None:
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)
    try:
        assert [m.id for m in client.models.list()] == ["tiny-llama"]
        done = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=12)
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 12
        stream = client.chat.completions.create(
            model="tiny-llama",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("You asked about")
        assert chunks[-1].usage is not None and not chunks[-1].choices
        comp = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=5)
        assert comp.choices[0].text and comp.usage is not None
        emb = client.embeddings.create(model="tiny-llama", input="hello")
        assert len(emb.data[0].embedding) == 32
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="nope", messages=HELLO)
    finally:
        client.close()


# -- fault switches ---------------------------------------------------------------


def test_fail_next_with_retry_after(client: httpx.Client) -> None:
    r = client.post("/_sim/faults", json={"fail_next": 2, "status": 503, "retry_after": 2})
    assert r.json()["faults"]["fail_next"] == 2
    for _ in range(2):
        r = client.get("/v1/models")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == 503
    assert client.get("/v1/models").status_code == 200
    assert client.get("/health").status_code == 200  # /v1/* only
    assert client.get("/_sim/stats").json()["requests"] == 3


def test_fail_with_raw_body_and_header_override(client: httpx.Client) -> None:
    client.post("/_sim/faults", json={"fail_next": 1, "status": 502, "body": "<html>bad gateway"})
    r = client.get("/v1/models")
    assert (r.status_code, r.text) == (502, "<html>bad gateway")
    r = (
        chat(client, messages=HELLO)
        if False
        else client.post(
            "/v1/chat/completions",
            json={"messages": HELLO},
            headers={"x-sim-fail-status": "429", "x-sim-retry-after": "1"},
        )
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_drop_after_chunks_is_a_protocol_error(client: httpx.Client) -> None:
    client.post("/_sim/faults", json={"drop_after_chunks": 3})
    events: list[str] = []

    def consume() -> None:
        body = {"messages": HELLO, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events.extend(line for line in r.iter_lines() if line)

    with pytest.raises(httpx.RemoteProtocolError):
        consume()
    assert len(events) == 3 and "data: [DONE]" not in events
    assert client.get("/_sim/stats").json()["dropped"] == 1
    # spent: the next stream is whole
    assert sse_events(chat(client, messages=HELLO, stream=True))[-1] == b"[DONE]"


def test_drop_after_header(client: httpx.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(
            "/v1/completions",
            json={"prompt": "hi", "stream": True},
            headers={"x-sim-drop-after": "1"},
        )


def test_first_byte_delay(client: httpx.Client) -> None:
    client.post("/_sim/faults", json={"first_byte_delay": 0.4})
    t0 = time.monotonic()
    assert client.get("/v1/models").status_code == 200
    assert time.monotonic() - t0 >= 0.4
    with pytest.raises(httpx.ReadTimeout):
        client.get("/v1/models", headers={"x-sim-first-byte-delay": "2"}, timeout=0.3)


def test_stall_after_chunks(client: httpx.Client) -> None:
    client.post("/_sim/faults", json={"stall_after_chunks": 2, "stall_seconds": 5})
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": HELLO, "stream": True},
        timeout=httpx.Timeout(10, read=0.5),
    ) as r:
        lines = r.iter_lines()
        got = [next(lines), next(lines), next(lines), next(lines)]  # 2 events with separators
        assert got[0].startswith("data: ") and got[2].startswith("data: ")
        with pytest.raises(httpx.ReadTimeout):
            next(lines)
    r = client.get("/_sim/wait_aborted", params={"n": 1, "timeout": 5})
    assert r.status_code == 200 and r.json()["aborted"] == 1


def test_garbage(client: httpx.Client) -> None:
    client.post("/_sim/faults", json={"garbage": True})
    r = chat(client, messages=HELLO, stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert not r.content.startswith(b"data: ")


def test_bad_fault_spec(client: httpx.Client) -> None:
    r = client.post("/_sim/faults", json={"fail_nxt": 1})
    assert r.status_code == 400 and "fail_nxt" in r.json()["error"]


# -- abort detection ----------------------------------------------------------------


def test_streaming_disconnect_is_aborted(client: httpx.Client, sim: ServerProcess) -> None:
    body = {"messages": HELLO, "stream": True, "max_tokens": 400}
    slow = {"x-sim-token-delay": "0.02", "x-sim-tokens": "400"}
    with (
        httpx.Client(base_url=sim.url, timeout=10) as other,
        other.stream("POST", "/v1/chat/completions", json=body, headers=slow) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert client.get("/_sim/stats").json()["open_streams"] == 1
    # leaving the block closed the connection mid-stream
    stats = client.get("/_sim/wait_aborted", params={"n": 1, "timeout": 5}).json()
    assert stats["aborted"] == 1 and stats["completed"] == 0
    assert stats["open_streams"] == 0
    assert stats["generation_tokens"] < 400


def test_non_streaming_disconnect_is_aborted(client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/chat/completions",
            json={"messages": HELLO, "max_tokens": 300},
            headers={"x-sim-token-delay": "0.05", "x-sim-tokens": "300"},
            timeout=0.3,
        )
    r = client.get("/_sim/wait_aborted", params={"n": 1, "timeout": 5})
    assert r.status_code == 200 and r.json()["aborted"] == 1


def test_wait_times_out_with_408(client: httpx.Client) -> None:
    r = client.get("/_sim/wait_aborted", params={"n": 1, "timeout": 0.1})
    assert r.status_code == 408 and r.json()["aborted"] == 0


def test_token_delay_streams_incrementally(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": HELLO, "stream": True, "max_tokens": 10},
        headers={"x-sim-token-delay": "0.1"},
    ) as r:
        lines = r.iter_lines()
        next(lines)  # role chunk arrives long before the whole stream
        assert client.get("/_sim/stats").json()["open_streams"] == 1
        rest = list(lines)
    assert "data: [DONE]" in rest
    assert client.get("/_sim/stats").json()["completed"] == 1


# -- observation ------------------------------------------------------------------


def test_stats_record_the_last_request(client: httpx.Client) -> None:
    chat(client, messages=HELLO, max_tokens=3)
    client.post(
        "/v1/completions",
        json={"prompt": "hi", "max_tokens": 2},
        headers={"x-request-id": "req-42", "Authorization": "Bearer upstream-key"},
    )
    stats = client.get("/_sim/stats").json()
    assert stats["requests"] == 2
    assert stats["by_path"] == {"/v1/chat/completions": 1, "/v1/completions": 1}
    assert stats["completed"] == 2 and stats["generation_tokens"] == 5
    last = stats["last_request"]
    assert last["path"] == "/v1/completions" and last["method"] == "POST"
    assert ["x-request-id", "req-42"] in last["headers"]
    assert ["authorization", "Bearer upstream-key"] in last["headers"]
    assert orjson.loads(last["body"]) == {"prompt": "hi", "max_tokens": 2}
    assert stats["request_ids"] == ["req-42"]


def test_metrics_counters(client: httpx.Client) -> None:
    chat(client, messages=HELLO, max_tokens=4)
    text = client.get("/metrics").text
    assert "# TYPE vllm:generation_tokens_total counter" in text
    assert 'vllm:generation_tokens_total{engine="0",model_name="tiny-llama"} 4.0' in text
    assert 'vllm:prompt_tokens_total{engine="0",model_name="tiny-llama"} 16.0' in text
    assert "# TYPE vllm:num_requests_running gauge" in text


# -- API key ------------------------------------------------------------------------


def test_api_key(keyed: ServerProcess) -> None:
    with httpx.Client(base_url=keyed.url, timeout=10) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.content == b'{"error":"Unauthorized"}'
        assert "vary" not in r.headers
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        ok = c.post(
            "/v1/chat/completions",
            json={"model": ALIAS, "messages": HELLO, "max_tokens": 2},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert ok.status_code == 200 and ok.json()["model"] == ALIAS
        for path in ("/health", "/metrics", "/version", "/_sim/stats"):
            assert c.get(path).status_code == 200, path
        assert c.post("/tokenize", json={"prompt": "hi"}).json()["count"] == 1
        assert c.post("/_sim/faults", json={"fail_next": 0}).status_code == 200
        models = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny-llama", ALIAS]


def test_help_lists_options() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "proxy.sim", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--host",
        "--port",
        "--model",
        "--tokens",
        "--token-delay",
        "--first-token-delay",
        "--max-model-len",
        "--api-key",
        "--log-level",
    ):
        assert option in out
