"""Request validation with vLLM's messages, in vLLM's order.

First the body as pydantic sees it (content type, JSON, field types), then
the semantic checks of the serving layer (model, max_tokens, n, context
length). The result is a :class:`GenRequest`, or a :class:`SimError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import tokenizer
from .errors import bad_request, input_repr, model_not_found, validation_error

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}

# Field order follows vLLM's request models, so multiple errors come in its order.
CHAT_FIELDS: tuple[tuple[str, str], ...] = (
    ("messages", "messages"),
    ("model", "str"),
    ("frequency_penalty", "float"),
    ("logit_bias", "dict"),
    ("logprobs", "bool"),
    ("top_logprobs", "int"),
    ("max_tokens", "int"),
    ("max_completion_tokens", "int"),
    ("n", "int"),
    ("presence_penalty", "float"),
    ("response_format", "dict"),
    ("seed", "int"),
    ("stop", "stop"),
    ("stream", "bool"),
    ("stream_options", "dict"),
    ("temperature", "float"),
    ("top_p", "float"),
    ("tools", "list"),
    ("user", "str"),
    ("top_k", "int"),
    ("min_tokens", "int"),
    ("ignore_eos", "bool"),
    ("include_stop_str_in_output", "bool"),
)
COMPLETION_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "str"),
    ("prompt", "prompt"),
    ("echo", "bool"),
    ("frequency_penalty", "float"),
    ("logit_bias", "dict"),
    ("logprobs", "int"),
    ("max_tokens", "int"),
    ("n", "int"),
    ("presence_penalty", "float"),
    ("seed", "int"),
    ("stop", "stop"),
    ("stream", "bool"),
    ("stream_options", "dict"),
    ("suffix", "str"),
    ("temperature", "float"),
    ("top_p", "float"),
    ("user", "str"),
    ("top_k", "int"),
    ("min_tokens", "int"),
    ("ignore_eos", "bool"),
    ("include_stop_str_in_output", "bool"),
)
EMBEDDING_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "str"),
    ("input", "prompt"),
    ("encoding_format", "str"),
    ("dimensions", "int"),
    ("user", "str"),
)
TOKENIZE_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "str"),
    ("prompt", "str"),
    ("messages", "messages"),
    ("add_special_tokens", "bool"),
    ("return_token_strs", "bool"),
)
REQUIRED = {
    "chat": ("messages",),
    "completion": ("prompt",),
    "embedding": ("input",),
    "tokenize": (),
}


@dataclass(slots=True)
class GenRequest:
    """A validated generation request (chat or completion)."""

    kind: str
    model: str
    prompts: list[str]  # the text answered: last user message, or each prompt
    prompt_tokens: list[int]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    limit: int = 16  # effective max_tokens
    temperature: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def parse_body(content_type: str, body: bytes) -> dict[str, Any]:
    """The JSON object of a request, or the 400 vLLM answers."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise validation_error(["Unsupported Media Type: Only 'application/json' is allowed"])
    if not body.strip():
        raise validation_error(
            [{"type": "missing", "loc": "body", "msg": "Field required", "input": None}]
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            pos = getattr(exc, "pos", getattr(exc, "start", 0))
            reason = getattr(exc, "msg", None) or getattr(exc, "reason", "invalid")
            raise validation_error(
                [
                    {
                        "type": "json_invalid",
                        "loc": f"body.{pos}",
                        "msg": "JSON decode error",
                        "input": "<dict of 0 items>",
                        "ctx": {"error": reason},
                    }
                ]
            ) from None
    if not isinstance(data, dict):
        raise validation_error(
            [
                {
                    "type": "model_attributes_type",
                    "loc": "body",
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "input": input_repr(data),
                }
            ]
        )
    return data


def _err(kind: str, loc: str, msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg, "input": input_repr(value)}


Error = dict[str, Any] | list[dict[str, Any]]


def _coerce(kind: str, loc: str, value: Any) -> tuple[Any, Error | None]:
    """pydantic's lax mode for the few types the simulator reads.

    The error is one pydantic error, or a list of them for a union type.
    """
    if value is None and kind != "messages":
        return None, None
    if kind == "int":
        if isinstance(value, bool | int):
            return int(value), None
        if isinstance(value, float):
            if value.is_integer():
                return int(value), None
            msg = "Input should be a valid integer, got a number with a fractional part"
            return None, _err("int_from_float", loc, msg, value)
        if isinstance(value, str):
            try:
                return int(value.strip()), None
            except ValueError:
                msg = "Input should be a valid integer, unable to parse string as an integer"
                return None, _err("int_parsing", loc, msg, value)
        return None, _err("int_type", loc, "Input should be a valid integer", value)
    if kind == "float":
        if isinstance(value, bool | int | float):
            return float(value), None
        if isinstance(value, str):
            try:
                return float(value.strip()), None
            except ValueError:
                msg = "Input should be a valid number, unable to parse string as a number"
                return None, _err("float_parsing", loc, msg, value)
        return None, _err("float_type", loc, "Input should be a valid number", value)
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, int | str) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE, None
        if isinstance(value, int | str):
            msg = "Input should be a valid boolean, unable to interpret input"
            return None, _err("bool_parsing", loc, msg, value)
        return None, _err("bool_type", loc, "Input should be a valid boolean", value)
    if kind == "str":
        if isinstance(value, str):
            return value, None
        return None, _err("string_type", loc, "Input should be a valid string", value)
    if kind == "dict":
        if isinstance(value, dict):
            return value, None
        return None, _err("dict_type", loc, "Input should be a valid dictionary", value)
    if kind == "list":
        if isinstance(value, list):
            return value, None
        return None, _err("list_type", loc, "Input should be a valid list", value)
    if kind == "stop":  # str | list[str]: pydantic reports each branch of the union
        if isinstance(value, str):
            return [value], None
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value, None
        errs = [_err("string_type", loc, "Input should be a valid string", value)]
        if not isinstance(value, list):
            return None, [*errs, _err("list_type", loc, "Input should be a valid list", value)]
        return None, errs + [
            _err("string_type", f"{loc}.{i}", "Input should be a valid string", s)
            for i, s in enumerate(value)
            if not isinstance(s, str)
        ]
    if kind == "prompt":
        if isinstance(value, str):
            return value, None
        if isinstance(value, list) and value:
            if all(isinstance(x, str) for x in value):
                return value, None
            if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
                return value, None
            if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in value):
                return value, None
        if not isinstance(value, list):  # list[int] | list[list[int]] | str | list[str]
            listy = _err("list_type", loc, "Input should be a valid list", value)
            stringy = _err("string_type", loc, "Input should be a valid string", value)
            return None, [listy, listy, stringy, listy]
        return None, _err("string_type", loc, "Input should be a valid string", value)
    if kind == "messages":
        if not isinstance(value, list):
            return None, _err("list_type", loc, "Input should be a valid list", value)
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                return None, _err(
                    "dict_type", f"{loc}.{i}", "Input should be a valid dictionary", m
                )
            if not isinstance(m.get("role"), str):
                return None, _err("missing", f"{loc}.{i}.role", "Field required", m)
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                # vLLM lists each message type of its union (22 errors); the first two
                # (and so the error's param) are these.
                at = f"{loc}.{i}.ChatCompletionDeveloperMessageParam.content"
                return None, [
                    _err("string_type", at, "Input should be a valid string", content),
                    _err("iterable_type", at, "Input should be iterable", content),
                ]
        return value, None
    raise AssertionError(kind)


def check_fields(
    data: dict[str, Any], fields: Sequence[tuple[str, str]], required: Sequence[str]
) -> dict[str, Any]:
    """Coerced values of ``fields``; all type errors at once, as pydantic reports them."""
    out: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, kind in fields:
        if name not in data:
            if name in required:
                errors.append(_err("missing", f"body.{name}", "Field required", data))
            continue
        value, error = _coerce(kind, f"body.{name}", data[name])
        if isinstance(error, list):
            errors.extend(error)
        elif error is not None:
            errors.append(error)
        else:
            out[name] = value
    if errors:
        raise validation_error(errors)
    return out


def message_text(content: Any) -> str:
    """The text of a message's ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def chat_messages(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], message_text(m.get("content"))) for m in messages]


def resolve_model(requested: str | None, models: Sequence[str]) -> str:
    if requested is None:
        return models[0]
    if requested not in models:
        raise model_not_found(requested, models)
    return requested


def _limits(
    req: GenRequest, requested: int | None, default: int | None, max_model_len: int
) -> None:
    if requested is not None and requested < 1:
        raise bad_request(
            f"max_tokens must be at least 1, got {requested}. "
            f"(parameter=max_tokens, value={requested})",
            "max_tokens",
        )
    if req.n < 1:
        raise bad_request(f"n must be at least 1, got {req.n}.")
    if req.n > 1 and req.temperature <= 1e-5:
        raise bad_request(f"n must be 1 when using greedy sampling, got {req.n}.")
    if req.temperature < 0:
        raise bad_request(f"temperature must be non-negative, got {req.temperature}.")
    if requested is not None and requested > max_model_len:
        raise bad_request(
            f"max_tokens={requested} cannot be greater than max_model_len={max_model_len}. "
            f"Please request fewer output tokens. (parameter=max_tokens, value={requested})",
            "max_tokens",
        )
    longest = max(req.prompt_tokens)
    if longest >= max_model_len:
        # vLLM stops tokenizing one token past the limit, hence "at least".
        shown = min(longest, max_model_len + 1)
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains at least {shown} input tokens, which exceeds this limit even "
            f"without any output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={shown})",
            "input_tokens",
        )
    room = max_model_len - longest
    wanted = requested if requested is not None else default
    req.limit = room if wanted is None else min(wanted, room)


def _common(req: GenRequest, f: dict[str, Any]) -> None:
    req.n = 1 if f.get("n") is None else f["n"]
    req.stream = bool(f.get("stream"))
    opts = f.get("stream_options") or {}
    req.include_usage = req.stream and bool(opts.get("include_usage"))
    temperature = f.get("temperature")
    req.temperature = 1.0 if temperature is None else temperature
    req.seed = f.get("seed")
    req.stops = [s for s in (f.get("stop") or []) if s]
    req.ignore_eos = bool(f.get("ignore_eos"))
    req.include_stop = bool(f.get("include_stop_str_in_output"))


def chat_request(data: dict[str, Any], models: Sequence[str], max_model_len: int) -> GenRequest:
    f = check_fields(data, CHAT_FIELDS, REQUIRED["chat"])
    model = resolve_model(f.get("model"), models)
    messages = chat_messages(f["messages"])
    last_user = next((t for r, t in reversed(messages) if r == "user"), "")
    req = GenRequest("chat", model, [last_user], [tokenizer.chat_prompt_tokens(messages)])
    _common(req, f)
    req.logprobs = bool(f.get("logprobs"))
    req.top_logprobs = max(0, min(20, f.get("top_logprobs") or 0))
    mct = f.get("max_completion_tokens")
    requested = mct if mct is not None else f.get("max_tokens")
    _limits(req, requested, None, max_model_len)
    return req


def prompt_list(prompt: str | list[Any]) -> list[tuple[str, int]]:
    """Each prompt of a completions/embeddings request as (text, token count)."""
    if isinstance(prompt, str):
        return [(prompt, tokenizer.count(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, tokenizer.count(p)) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [(" ".join(map(str, prompt)), len(prompt))]
    return [(" ".join(map(str, p)), len(p)) for p in prompt]


def completion_request(
    data: dict[str, Any], models: Sequence[str], max_model_len: int
) -> GenRequest:
    f = check_fields(data, COMPLETION_FIELDS, REQUIRED["completion"])
    model = resolve_model(f.get("model"), models)
    prompts = prompt_list(f["prompt"])
    req = GenRequest("completion", model, [p for p, _ in prompts], [n for _, n in prompts])
    _common(req, f)
    _limits(req, f.get("max_tokens"), 16, max_model_len)
    return req
