"""Deterministic embeddings: hashed bag of words, L2-normalised.

Texts that share words get similar vectors, so a toy similarity search
behaves sensibly; the same text always gets the same vector.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from typing import Any

import orjson

from . import tokenizer

DEFAULT_DIM = 32


def vector(text: str, dim: int = DEFAULT_DIM) -> list[float]:
    v = [0.0] * dim
    for piece in tokenizer.split(text.lower()):
        word = piece.strip()
        if not word:
            continue
        h = zlib.crc32(word.encode())
        v[h % dim] += 1.0 if (h >> 16) & 1 else -1.0
        v[(h >> 8) % dim] += 0.5
    norm = math.sqrt(sum(x * x for x in v))
    if norm == 0.0:
        v[0] = norm = 1.0
    return [round(x / norm, 6) for x in v]


def embeddings_body(
    *, rid: str, created: int, model: str, inputs: list[tuple[str, int]], dim: int, b64: bool
) -> bytes:
    data: list[dict[str, Any]] = []
    for i, (text, _) in enumerate(inputs):
        vec = vector(text, dim)
        emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
        data.append({"index": i, "object": "embedding", "embedding": emb})
    tokens = sum(n for _, n in inputs)
    return orjson.dumps(
        {
            "id": rid,
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    )
