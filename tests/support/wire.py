"""Reading what an OpenAI-compatible server sends: SSE events, shapes, normalised bodies."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

VOLATILE_KEYS = frozenset({"id", "created", "system_fingerprint"})


def sse_events(raw: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, asserting vLLM's framing.

    vLLM sends every event as exactly ``data: <payload>\\n\\n`` (no ``event:``/``id:``
    lines, no comments, ``\\n`` line ends) and ends with ``data: [DONE]\\n\\n``.
    """
    assert raw.endswith(b"\n\n"), raw[-200:]
    blocks = raw[:-2].split(b"\n\n")
    out = []
    for block in blocks:
        assert block.startswith(b"data: "), block[:200]
        assert b"\n" not in block and b"\r" not in block, block[:200]
        out.append(block[len(b"data: ") :])
    return out


def stream_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a vLLM stream; asserts it ends with exactly one ``[DONE]``."""
    events = sse_events(raw)
    assert events[-1] == b"[DONE]", events[-3:]
    assert b"[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def stream_text(chunks: list[dict[str, Any]], chat: bool) -> str:
    parts = []
    for c in chunks:
        for choice in c["choices"]:
            parts.append((choice["delta"].get("content") or "") if chat else choice["text"])
    return "".join(parts)


def post_raw(
    url: str, body: dict | bytes, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[httpx.Response, bytes]:
    """POST and read the raw body (streamed, so an SSE answer is seen byte for byte)."""
    kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    hdrs = {"content-type": "application/json", **(headers or {})}
    with httpx.Client(timeout=timeout) as client:
        with client.stream("POST", url, headers=hdrs, **kw) as r:
            return r, b"".join(r.iter_raw())


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys in order and value types, no values.

    Strings, numbers and booleans become their type name, so two answers with
    different texts, ids or token counts have the same shape. Lists of objects keep
    their length (choices, logprob entries); lists of scalars (token ids, bytes)
    become the sorted set of their element types, as their length is the tokenizer's;
    a logprob's ``bytes`` is just ``bytes``.
    """
    if isinstance(value, dict):
        # A token's UTF-8 ``bytes`` may be empty (a special token) in vLLM.
        return [(k, "bytes" if k == "bytes" else shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        shapes = [shape(v) for v in value]
        if all(isinstance(v, str | None) for v in shapes):
            return sorted(set(shapes), key=str)
        return shapes
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "str"


def normalise(value: Any) -> Any:
    """``value`` with ids, timestamps and fingerprints blanked (they differ per request)."""
    if isinstance(value, dict):
        return {k: "X" if k in VOLATILE_KEYS else normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


_VOLATILE_RAW = re.compile(rb'"(id|created|system_fingerprint)":("[^"]*"|\d+)')


def normalise_raw(raw: bytes) -> bytes:
    """Raw bytes with ids, timestamps and fingerprints blanked; all else byte for byte."""
    return _VOLATILE_RAW.sub(rb'"\1":X', raw)
