"""vLLM 0.32's response bytes: header lists, SSE chunks and JSON bodies.

Key order and the null keys follow the recorded transcripts in
``reference/vllm-wire/``. Streaming chunks are assembled from byte fragments
computed once per request, so a token costs one small ``orjson.dumps``.
"""

from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache
from typing import Any

import orjson

from .generate import Plan
from .options import VLLM_VERSION

DONE = b"data: [DONE]\n\n"
JSON_TYPE = b"application/json"
SSE_TYPE = b"text/event-stream; charset=utf-8"
METRICS_TYPE = b"text/plain; version=1.0.0; charset=utf-8"
VARY = (b"vary", b"Origin")


def json_headers(body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> list:
    """Starlette's order: given headers, content-length, content-type; then CORS' vary."""
    return [
        *(extra or ()),
        (b"content-length", str(len(body)).encode()),
        (b"content-type", JSON_TYPE),
        VARY,
    ]


SSE_HEADERS = [(b"content-type", SSE_TYPE), VARY]


def fingerprint(models: tuple[str, ...], max_model_len: int) -> str:
    digest = hashlib.sha256(f"{models}:{max_model_len}".encode()).hexdigest()
    return f"vllm-{VLLM_VERSION}-{digest[:8]}"


@lru_cache(maxsize=65536)
def jstr(text: str) -> bytes:
    return orjson.dumps(text)


def _logprob(piece: str) -> float:
    return -((zlib.crc32(piece.encode()) % 4000) / 1000.0) - 0.001


_ALTERNATIVES = (" the", " a", " and", ".", ",", " to", " of", " is", " it", " that")


def logprob_entry(piece: str, top: int) -> dict[str, Any]:
    """One entry of ``logprobs.content``: the chosen token first among its top alternatives."""
    lp = _logprob(piece)
    tops = [{"token": piece, "logprob": lp, "bytes": list(piece.encode())}]
    for alt in _ALTERNATIVES:
        if len(tops) >= top:
            break
        if alt != piece:
            tops.append(
                {"token": alt, "logprob": lp - 0.5 * len(tops), "bytes": list(alt.encode())}
            )
    return {"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": tops}


class StreamFramer:
    """Pre-built fragments of one streaming response's SSE events."""

    __slots__ = ("_fp", "_heads", "_mid", "_pre", "_top", "_usage_head", "chat", "logprobs")

    def __init__(
        self,
        *,
        chat: bool,
        rid: str,
        created: int,
        model: str,
        fingerprint: str,
        include_usage: bool,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> None:
        self.chat = chat
        self.logprobs = logprobs
        self._top = top_logprobs
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        common = (
            b'data: {"id":"'
            + rid.encode()
            + b'","object":"'
            + obj
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + jstr(model)
            + b',"choices":'
        )
        self._pre = common + b'[{"index":'
        self._usage_head = common + b'[],"usage":'
        self._fp = b',"system_fingerprint":' + jstr(fingerprint)
        # The finish chunk names the fingerprint unless a usage chunk follows.
        self._mid = b"" if include_usage else self._fp
        self._heads: dict[int, bytes] = {}

    def _head(self, index: int) -> bytes:
        head = self._heads.get(index)
        if head is None:
            field = b',"delta":{"content":' if self.chat else b',"text":'
            head = self._heads[index] = self._pre + str(index).encode() + field
        return head

    def _lp(self, piece: str) -> bytes:
        if not self.logprobs:
            return b"null"
        return orjson.dumps({"content": [logprob_entry(piece, self._top)]})

    def role(self, index: int) -> bytes:
        return (
            self._pre
            + str(index).encode()
            + b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
            b',"prompt_token_ids":null,"prompt_text":null}\n\n'
        )

    def token(self, index: int, piece: str) -> bytes:
        if self.chat:
            return (
                self._head(index)
                + jstr(piece)
                + b'},"logprobs":'
                + self._lp(piece)
                + b',"finish_reason":null,"token_ids":null}]}\n\n'
            )
        return (
            self._head(index)
            + jstr(piece)
            + b',"logprobs":null,"finish_reason":null,"stop_reason":null,'
            b'"prompt_token_ids":null,"token_ids":null}]}\n\n'
        )

    def last(self, index: int, piece: str, finish: str, stop_reason: str | None) -> bytes:
        reason = b"null" if stop_reason is None else jstr(stop_reason)
        if self.chat:
            return (
                self._head(index)
                + jstr(piece)
                + b'},"logprobs":'
                + self._lp(piece)
                + b',"finish_reason":"'
                + finish.encode()
                + b'","stop_reason":'
                + reason
                + b',"token_ids":null}]'
                + self._mid
                + b"}\n\n"
            )
        return (
            self._head(index)
            + jstr(piece)
            + b',"logprobs":null,"finish_reason":"'
            + finish.encode()
            + b'","stop_reason":'
            + reason
            + b',"prompt_token_ids":null,"token_ids":null}]'
            + self._mid
            + b"}\n\n"
        )

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        total = prompt_tokens + completion_tokens
        return (
            self._usage_head
            + b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
            % (prompt_tokens, total, completion_tokens)
            + self._fp
            + b"}\n\n"
        )


def _usage(prompt_tokens: int, completion_tokens: int, details: bool = True) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if details:
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
    return usage


def chat_body(
    *,
    rid: str,
    created: int,
    model: str,
    fingerprint: str,
    plans: list[Plan],
    prompt_tokens: int,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> bytes:
    choices = []
    for i, plan in enumerate(plans):
        lp = (
            {"content": [logprob_entry(p, top_logprobs) for p in plan.pieces]} if logprobs else None
        )
        choices.append(
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": plan.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": lp,
                "finish_reason": plan.finish_reason,
                "stop_reason": plan.stop_reason,
                "token_ids": None,
                "routed_experts": None,
            }
        )
    completion = sum(len(p.pieces) for p in plans)
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": fingerprint,
            "usage": _usage(prompt_tokens, completion),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


def completion_body(
    *, rid: str, created: int, model: str, fingerprint: str, plans: list[Plan], prompt_tokens: int
) -> bytes:
    choices = [
        {
            "index": i,
            "text": plan.text,
            "logprobs": None,
            "finish_reason": plan.finish_reason,
            "stop_reason": plan.stop_reason,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
        }
        for i, plan in enumerate(plans)
    ]
    completion = sum(len(p.pieces) for p in plans)
    return orjson.dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": fingerprint,
            "usage": _usage(prompt_tokens, completion),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


def models_body(
    models: tuple[str, ...], max_model_len: int, created: int, perm_ids: list[str]
) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": models[0],
                    "parent": None,
                    "max_model_len": max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{perm}",
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for name, perm in zip(models, perm_ids, strict=True)
            ],
        }
    )
