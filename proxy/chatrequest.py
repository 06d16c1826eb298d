"""Validation of ``POST /chat`` requests: pure functions, JSON bytes in, vLLM payload out.

``messages`` is required (a non-empty list of ``{role, content}``, role in
system/user/assistant/tool); ``max_tokens`` >= 1, ``temperature`` in 0..2,
``top_p`` in (0, 1], ``stream`` a boolean; defaults from the settings. Other
fields pass through to vLLM, except ``n`` (only 1) and ``stream_options``
(the gateway sets it). Every rejection is a 400 whose ``param`` names the field.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from proxy.config import Settings
from proxy.errors import BadRequest

ROLES = ("system", "user", "assistant", "tool")
RESERVED = ("stream_options",)
# JSON nesting /chat accepts (orjson reads 1024 levels but writes only 254).
MAX_DEPTH = 128


class InvalidChat(BadRequest):
    code = "invalid_value"


def _fail(param: str, message: str, code: str = "invalid_value") -> InvalidChat:
    return InvalidChat(message, param=param, code=code)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def check_messages(messages: Any) -> None:
    """Raise :class:`InvalidChat` unless ``messages`` is a non-empty list of {role, content}."""
    if messages is None:
        raise _fail("messages", "'messages' is required", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _fail(
            "messages", "'messages' must be a list of {role, content} objects", "invalid_type"
        )
    if not messages:
        raise _fail("messages", "'messages' must not be empty")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(
                where, f"{where} must be an object with 'role' and 'content'", "invalid_type"
            )
        role = message.get("role")
        if role not in ROLES:
            raise _fail(
                f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}"
            )
        if "content" not in message:
            raise _fail(
                f"{where}.content", f"{where}.content is required", "missing_required_parameter"
            )
        content = message["content"]
        # A list is OpenAI's content parts (text, image_url...): vLLM checks them.
        if not (isinstance(content, str | list) or (content is None and role == "assistant")):
            raise _fail(f"{where}.content", f"{where}.content must be a string", "invalid_type")


def parse_chat(body: bytes, settings: Settings) -> tuple[dict[str, Any], bool]:
    """Validate a ``/chat`` body; return the upstream ``/chat/completions`` payload and ``stream``.

    Raises :class:`InvalidChat` (400) naming the offending field in ``param``.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _fail("body", f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise _fail("body", "request body must be a JSON object", "invalid_type")
    if _too_deep(data, MAX_DEPTH):
        raise _fail("body", f"request body nests deeper than {MAX_DEPTH} levels")
    return chat_payload(data, settings)


def chat_payload(data: dict[str, Any], settings: Settings) -> tuple[dict[str, Any], bool]:
    """:func:`parse_chat` on an already decoded object (a ``/chat/ws`` message's fields)."""
    check_messages(data.get("messages"))

    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise _fail("model", "'model' must be a non-empty string", "invalid_type")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise _fail("max_tokens", "'max_tokens' must be an integer", "invalid_type")
        if max_tokens < 1:
            raise _fail("max_tokens", f"'max_tokens' must be at least 1; got {max_tokens}")
    temperature = data.get("temperature")
    if temperature is not None:
        if not _number(temperature):
            raise _fail("temperature", "'temperature' must be a number", "invalid_type")
        if not 0 <= temperature <= 2:
            raise _fail("temperature", f"'temperature' must be between 0 and 2; got {temperature}")
    top_p = data.get("top_p")
    if top_p is not None:
        if not _number(top_p):
            raise _fail("top_p", "'top_p' must be a number", "invalid_type")
        if not (0 < top_p <= 1) or math.isnan(top_p):
            raise _fail("top_p", f"'top_p' must be greater than 0 and at most 1; got {top_p}")
    stop = data.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _fail("stop", "'stop' must be a string or a list of strings", "invalid_type")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("stream", "'stream' must be true or false", "invalid_type")
    n = data.get("n")
    if n is not None and n != 1:
        raise _fail("n", "/chat returns one answer: 'n' must be 1 (use /v1/chat/completions)")
    for name in RESERVED:
        if name in data:
            raise _fail(name, f"'{name}' is set by the gateway on /chat; leave it out")

    payload = {k: v for k, v in data.items() if v is not None}
    payload["model"] = model or settings.model
    payload["max_tokens"] = settings.default_max_tokens if max_tokens is None else max_tokens
    payload["temperature"] = settings.default_temperature if temperature is None else temperature
    payload["stream"] = stream
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload, stream
