"""Request validation: vLLM's exact error bodies for the recorded bad requests."""

from __future__ import annotations

import orjson
import pytest

from proxy.sim.errors import SimError
from proxy.sim.validate import chat_request, completion_request, parse_body

from .test_sim_wire import load_transcript

MODELS = ("tiny-llama",)
CTX = 512  # the recorded server's max_model_len
JSON = "application/json"


def answer(content_type: str, body: bytes, path: str = "/v1/chat/completions") -> SimError:
    build = chat_request if path.endswith("chat/completions") else completion_request
    with pytest.raises(SimError) as info:
        build(parse_body(content_type, body), MODELS, CTX)
    return info.value


@pytest.mark.parametrize(
    "name",
    [
        "08_unknown_model.txt",
        "08b_unknown_model_stream.txt",
        "09_malformed_json.txt",
        "10_max_tokens_too_large.txt",
        "10b_max_tokens_too_large_stream.txt",
        "10c_completions_max_tokens_too_large.txt",
        "10f_max_tokens_zero.txt",
        "11_missing_messages.txt",
        "12_wrong_type.txt",
        "17_chat_n2_stream.txt",
        "19_prompt_too_long.txt",
        "22_post_empty_body_no_content_type.txt",
    ],
)
def test_error_body_is_byte_identical(name: str) -> None:
    t = load_transcript(name)
    content_type = "" if t.request_body is None else JSON
    err = answer(content_type, t.request_body or b"", t.path)
    assert err.status == t.status
    assert err.body == t.body


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"messages": [], "max_tokens": 1.5}, "body.max_tokens", "int_from_float"),
        ({"messages": [], "temperature": "hot"}, "body.temperature", "float_parsing"),
        ({"messages": [], "stream": "maybe"}, "body.stream", "bool_parsing"),
        ({"messages": [], "model": 3}, "body.model", "string_type"),
        ({"messages": [], "stream_options": []}, "body.stream_options", "dict_type"),
        ({"messages": ["hi"]}, "body.messages.0", "dict_type"),
        ({"messages": [{"content": "hi"}]}, "body.messages.0.role", "missing"),
    ],
)
def test_type_errors_name_the_field(body: dict, loc: str, kind: str) -> None:
    err = answer(JSON, orjson.dumps(body))
    error = orjson.loads(err.body)["error"]
    assert err.status == 400
    assert error["type"] == "Bad Request"
    assert error["param"] == loc
    assert f"'type': '{kind}'" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [], "max_tokens": "4"},
        {"messages": [], "max_tokens": 4.0},
        {"messages": [], "stream": "true", "temperature": "0.5"},
        {"messages": [], "stop": "x"},
    ],
)
def test_lax_coercion_like_pydantic(body: dict) -> None:
    req = chat_request(parse_body(JSON, orjson.dumps(body)), MODELS, CTX)
    assert req.kind == "chat"


def test_not_json_object() -> None:
    err = answer(JSON, b"[1, 2]")
    assert orjson.loads(err.body)["error"]["param"] == "body"


def test_content_type_with_charset_is_json() -> None:
    req = chat_request(
        parse_body("application/json; charset=utf-8", b'{"messages":[]}'), MODELS, CTX
    )
    assert req.model == "tiny-llama"  # the default model when none is named


def test_limits_and_defaults() -> None:
    def build(**kw: object):
        body = {"messages": [{"role": "user", "content": "hi"}], **kw}
        return chat_request(body, MODELS, CTX)

    assert build().limit == CTX - 11  # no max_tokens: the rest of the context
    assert build(max_tokens=510).limit == CTX - 11  # clamped, like the recorded 10d
    assert build(max_tokens=10, max_completion_tokens=3).limit == 3
    assert build(stream=True, stream_options={"include_usage": True}).include_usage
    assert not build(stream=False, stream_options={"include_usage": True}).include_usage
    assert build(stop=["a", ""]).stops == ["a"]
    comp = completion_request({"prompt": ["a b", "c"]}, MODELS, CTX)
    assert comp.limit == 16  # the completions API's default max_tokens
    assert comp.prompt_tokens == [2, 1]
    ids = completion_request({"prompt": [1, 2, 3]}, MODELS, CTX)
    assert ids.prompt_tokens == [3]


def test_negative_temperature_rejected() -> None:
    err = answer(JSON, b'{"messages":[],"temperature":-1}')
    assert orjson.loads(err.body)["error"]["type"] == "BadRequestError"
