"""The /chat request validator and translator (pure functions)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.chat import _StreamState, translate_completion
from proxy.chatrequest import InvalidChat, parse_chat
from proxy.config import Settings

SETTINGS = Settings(model="m-default", default_max_tokens=99, default_temperature=0.3)
HI = [{"role": "user", "content": "hi"}]


def parse(body: object) -> tuple[dict, bool]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_chat(raw, SETTINGS)


def test_defaults_come_from_settings() -> None:
    payload, stream = parse({"messages": HI})
    assert stream is False
    assert payload == {
        "messages": HI,
        "model": "m-default",
        "max_tokens": 99,
        "temperature": 0.3,
        "stream": False,
    }


def test_explicit_values_and_unknown_fields_pass_through() -> None:
    body = {
        "messages": HI,
        "model": "x",
        "max_tokens": 5,
        "temperature": 0,
        "top_p": 0.5,
        "stop": ["\n"],
        "stream": True,
        "seed": 7,
        "top_k": 3,
    }
    payload, stream = parse(body)
    assert stream is True
    assert payload == {**body, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", "body", "invalid_json"),
        (b"", "body", "invalid_json"),
        ([1, 2], "body", "invalid_type"),
        ({}, "messages", "missing_required_parameter"),
        ({"messages": None}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({"messages": HI, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": HI, "max_tokens": -3}, "max_tokens", "invalid_value"),
        ({"messages": HI, "max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"messages": HI, "max_tokens": "10"}, "max_tokens", "invalid_type"),
        ({"messages": HI, "max_tokens": True}, "max_tokens", "invalid_type"),
        ({"messages": HI, "temperature": 2.01}, "temperature", "invalid_value"),
        ({"messages": HI, "temperature": -0.1}, "temperature", "invalid_value"),
        ({"messages": HI, "temperature": "hot"}, "temperature", "invalid_type"),
        ({"messages": HI, "top_p": 0}, "top_p", "invalid_value"),
        ({"messages": HI, "top_p": 1.5}, "top_p", "invalid_value"),
        ({"messages": HI, "stop": 3}, "stop", "invalid_type"),
        ({"messages": HI, "stop": ["a", 1]}, "stop", "invalid_type"),
        ({"messages": HI, "stream": "true"}, "stream", "invalid_type"),
        ({"messages": HI, "stream": 1}, "stream", "invalid_type"),
        ({"messages": HI, "model": ""}, "model", "invalid_type"),
        ({"messages": HI, "n": 2}, "n", "invalid_value"),
        ({"messages": HI, "stream_options": {}}, "stream_options", "invalid_value"),
    ],
)
def test_bad_input_names_the_field(body: object, param: str, code: str) -> None:
    with pytest.raises(InvalidChat) as info:
        parse(body)
    err = orjson.loads(info.value.body())["error"]
    assert info.value.status == 400
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert err["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
FIELDS = ("body", "messages", "max_tokens", "temperature", "top_p", "stop", "model", "stream")
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": st.text()}
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*FIELDS[1:], "x"]),
        json_values | st.lists(message, max_size=2),
    )
)
def test_validator_accepts_or_rejects_cleanly(body: dict) -> None:
    """Any JSON object: a valid payload obeying the rules, or a 400 naming a field."""
    try:
        payload, stream = parse_chat(json.dumps(body).encode(), SETTINGS)
    except InvalidChat as exc:
        assert exc.param is not None
        assert exc.param in FIELDS or exc.param.startswith("messages[")
        if exc.param == "body":  # only an infinity, which JSON cannot carry
            assert "Infinity" in json.dumps(body)
        return
    assert isinstance(payload["messages"], list) and payload["messages"]
    assert isinstance(payload["max_tokens"], int) and payload["max_tokens"] >= 1
    assert 0 <= payload["temperature"] <= 2
    assert payload["stream"] is stream
    assert isinstance(payload["model"], str) and payload["model"]
    assert ("stream_options" in payload) is stream


@settings(max_examples=200, deadline=None)
@given(
    st.lists(message, min_size=1, max_size=3),
    st.integers(1, 10_000),
    st.floats(0, 2),
    st.booleans(),
)
def test_every_valid_request_is_accepted(
    messages: list, max_tokens: int, temperature: float, stream: bool
) -> None:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    payload, got_stream = parse({**body, "stream": stream})
    assert got_stream is stream
    assert payload["messages"] == messages
    assert (payload["max_tokens"], payload["temperature"]) == (max_tokens, temperature)


def test_translate_completion_shape() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi!"},
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": 2,
                "total_tokens": 5,
                "prompt_tokens_details": None,
            },
        }
    )
    assert translate_completion(body, "fallback") == {
        "content": "Hi!",
        "model": "m",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "finish_reason": "length",
    }


def test_stream_state_reads_deltas_finish_and_usage() -> None:
    state = _StreamState("m")
    role = '{"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    assert state.on_chunk(role) is None
    assert state.on_chunk('{"choices":[{"index":0,"delta":{"content":"a\\nb"}}]}') == "a\nb"
    last = '{"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}'
    assert state.on_chunk(last) == "!"
    usage = '{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}'
    assert state.on_chunk(usage) is None
    assert state.on_chunk("[DONE]") is None and state.done
    assert state.finish_reason == "stop"
    assert state.usage == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
