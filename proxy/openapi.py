"""The OpenAPI 3.1 document behind ``/docs``: every endpoint, with request and response examples.

Written by hand (the ``/v1`` relay has no models to derive it from). ``root_path``
becomes the schema's ``servers`` when the gateway is mounted under a prefix.
"""

from __future__ import annotations

from typing import Any

from proxy.config import Settings


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_ERRORS = {
    "400": _error("Bad input: the message names the field, `param` holds its name"),
    "401": _error("Missing or wrong API key (when `VLLM_WRAPPER_API_KEY` is set)"),
    "413": _error("Request body over `VLLM_WRAPPER_MAX_BODY_BYTES`"),
    "502": _error("The upstream sent something unexpected"),
    "503": _error("The upstream is unavailable after the retries"),
    "504": _error("The upstream timed out"),
}

# POST /chat and the cached /v1 paths: the response cache and Idempotency-Key (README).
_CACHE_PARAMETERS = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        "description": "A retry with the same key and body gets the first answer again "
        "(`idempotent-replayed: true`) instead of a second generation; 24 h, per API key.",
    },
    {
        "name": "Cache-Control",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "examples": ["no-cache", "no-store"]},
        "description": "With `[cache] enabled`: `no-cache` skips the lookup, `no-store` "
        "the cache. Responses carry `x-cache: HIT | MISS | BYPASS` (and `age` on a hit).",
    },
]
_CACHE_ERRORS = {
    "409": _error("`idempotency_in_progress`: a request with this Idempotency-Key still runs"),
    "422": _error("`idempotency_key_reused`: this Idempotency-Key was used with another body"),
}

_CHAT_EXAMPLE = {
    "messages": [
        {"role": "system", "content": "你是一个有帮助的AI助手"},
        {"role": "user", "content": "你好，请介绍一下你自己"},
    ],
    "max_tokens": 512,
    "temperature": 0.7,
}
_STREAM_EXAMPLE = (
    "data: 你好\n\ndata: ！\n\ndata: first line\ndata: second line\n\n"
    'event: usage\ndata:{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52,'
    '"finish_reason":"stop","model":"meta-llama/Llama-3.1-70B-Instruct"}\n\n'
    "data: [DONE]\n\n"
)


def _json(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": schema}
    if example is not None:
        body["example"] = example
    return {"application/json": body}


def _passthrough(
    summary: str, method: str, example: Any = None, *, cached: bool = False
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": ["OpenAI-compatible (relayed to vLLM)"],
        "summary": summary,
        "description": "Relayed to `{VLLM_BASE_URL}` byte for byte, streaming or not; "
        "vLLM's own answer (and its errors) come back unchanged. See vLLM's "
        "OpenAI-compatible server docs for every field.",
        "responses": {
            "200": {
                "description": "vLLM's answer (`text/event-stream` when `stream` is true)",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **_ERRORS,
        },
    }
    if cached:
        op["parameters"] = _CACHE_PARAMETERS
        op["responses"].update(_CACHE_ERRORS)
    if method == "post":
        op["requestBody"] = {
            "required": True,
            "content": _json({"type": "object", "additionalProperties": True}, example),
        }
    return op


def build_openapi(settings: Settings, root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``servers`` is ``root_path`` when mounted under one."""
    model = settings.model
    chat_response = {
        "content": "你好！我是一个AI助手……",
        "model": model,
        "usage": {"prompt_tokens": 25, "completion_tokens": 150, "total_tokens": 175},
        "finish_reason": "stop",
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "vllm-wrapper",
            "version": "0.1.0",
            "description": "An OpenAI-compatible gateway for vLLM: `/chat` (simplified), "
            "`/v1/*` (vLLM's OpenAI API, relayed), `/health`, `/models`. "
            + (
                "Requests need `Authorization: Bearer <key>`: use **Authorize**."
                if settings.wrapper_api_key
                else "This gateway runs without an API key."
            ),
        },
        "paths": {
            "/chat": {
                "post": {
                    "tags": ["Simplified"],
                    "parameters": _CACHE_PARAMETERS,
                    "summary": "Chat in one call (JSON answer, or text as server-sent events)",
                    "description": (
                        f"Defaults: `model` {model!r}, `max_tokens` "
                        f"{settings.default_max_tokens}, `temperature` "
                        f"{settings.default_temperature}. Other fields go to vLLM unchanged "
                        "(`seed`, `top_k`...), except `n` (only 1) and `stream_options`.\n\n"
                        "With `stream: true`: one `data:` event per generated piece of text "
                        "(a text with line breaks spans several `data:` lines of one event), "
                        "then `event: usage` with the token counts, then `data: [DONE]`. "
                        "An upstream failure after the stream began ends it with "
                        "`event: error` and an error object as data (no `[DONE]`)."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ChatRequest"},
                                "examples": {
                                    "chat": {"summary": "Non-streaming", "value": _CHAT_EXAMPLE},
                                    "stream": {
                                        "summary": "Streaming",
                                        "value": {
                                            "messages": [{"role": "user", "content": "写一首短诗"}],
                                            "stream": True,
                                            "max_tokens": 200,
                                        },
                                    },
                                },
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "The answer",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ChatResponse"},
                                    "example": chat_response,
                                },
                                "text/event-stream": {
                                    "schema": {"type": "string"},
                                    "example": _STREAM_EXAMPLE,
                                },
                            },
                        },
                        **_ERRORS,
                        "404": _error("`conversation_id` names no conversation of this key"),
                        "409": _error(
                            "`conversation_busy`: the conversation is answering a turn; "
                            "`idempotency_in_progress`: a request with this Idempotency-Key "
                            "still runs"
                        ),
                        "422": _CACHE_ERRORS["422"],
                    },
                }
            },
            "/": {
                "get": {
                    "tags": ["Operations"],
                    "summary": "What this server is: name, version and links",
                    "responses": {
                        "200": {
                            "description": "Index",
                            "content": _json(
                                {"type": "object"},
                                {"name": "vllm-wrapper", "links": {"docs": "/docs"}},
                            ),
                        },
                        **_ERRORS,
                    },
                }
            },
            "/health": {
                "get": {
                    "tags": ["Operations"],
                    "summary": "Liveness, and whether vLLM answers",
                    "description": "Always 200 while the gateway runs; `?strict=1` gives "
                    "503 when vLLM does not answer. Never needs a key.",
                    "security": [],
                    "parameters": [
                        {
                            "name": "strict",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["1"]},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "Gateway status",
                            "content": _json(
                                {"$ref": "#/components/schemas/Health"},
                                {
                                    "status": "healthy",
                                    "vllm_available": True,
                                    "model": model,
                                    "base_url": settings.public_base_url,
                                },
                            ),
                        },
                        "503": _error("With `strict=1`: vLLM unavailable"),
                    },
                }
            },
            "/admin/reload": {
                "post": {
                    "tags": ["Operations"],
                    "summary": "Re-read the configuration file",
                    "description": "Needs `VLLM_WRAPPER_API_KEY`; with auth off, only from "
                    "loopback. A bad file changes nothing (400 `invalid_config`).",
                    "responses": {
                        "200": {"description": "Reloaded"},
                        "202": {"description": "Every worker signalled (`--workers N`)"},
                        "400": _error("No config file, or a bad one (nothing changed)"),
                        "401": _ERRORS["401"],
                        "403": _error("Auth off and the request is not from loopback"),
                    },
                }
            },
            "/models": {
                "get": {
                    "tags": ["Operations"],
                    "summary": "The models vLLM serves (its `/v1/models`, relayed)",
                    "responses": {
                        "200": {
                            "description": "Model list",
                            "content": _json(
                                {"$ref": "#/components/schemas/ModelList"},
                                {"object": "list", "data": [{"id": model, "object": "model"}]},
                            ),
                        },
                        **_ERRORS,
                    },
                }
            },
            "/usage": {
                "get": {
                    "tags": ["Operations"],
                    "summary": "The calling key's limits and use (an admin key: every key)",
                    "parameters": [
                        {
                            "name": "key",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "Admin keys only: one key's name",
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "Limits, window counts and quota use per key",
                            "content": _json(
                                {"type": "object"},
                                {
                                    "object": "usage",
                                    "keys": [
                                        {
                                            "name": "team-a",
                                            "limits": {"rpm": 60, "daily_tokens": 100000},
                                            "usage": {
                                                "requests_per_minute": 3,
                                                "tokens_today": 412,
                                            },
                                            "resets": {
                                                "requests_per_minute": "41.2s",
                                                "tokens_today": "4h41m23s",
                                            },
                                        }
                                    ],
                                },
                            ),
                        },
                        "401": _ERRORS["401"],
                        "403": _error("Another key's usage, asked by a key that is not admin"),
                        "404": _error("No key of that name"),
                        "503": _error("The shared state is unavailable"),
                    },
                }
            },
            "/v1/chat/completions": {
                "post": _passthrough(
                    "OpenAI chat completions",
                    "post",
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": "Hello!"}],
                        "temperature": 0.7,
                        "max_tokens": 100,
                    },
                    cached=True,
                )
            },
            "/v1/completions": {
                "post": _passthrough(
                    "OpenAI text completions",
                    "post",
                    {"model": model, "prompt": "Once upon a time", "max_tokens": 32},
                    cached=True,
                )
            },
            "/v1/embeddings": {
                "post": _passthrough(
                    "OpenAI embeddings (when vLLM serves an embedding model)",
                    "post",
                    {"model": model, "input": "hello"},
                    cached=True,
                )
            },
            "/v1/models": {"get": _passthrough("OpenAI model list", "get")},
            "/tokenize": {
                "post": _passthrough(
                    "vLLM's tokenizer (relayed to vLLM's root /tokenize)",
                    "post",
                    {"model": model, "prompt": "Hello world"},
                )
            },
            "/detokenize": {
                "post": _passthrough(
                    "vLLM's detokenizer (relayed to vLLM's root /detokenize)",
                    "post",
                    {"model": model, "tokens": [9906, 1917]},
                )
            },
            "/v1/{path}": {
                "parameters": [
                    {
                        "name": "path",
                        "in": "path",
                        "required": True,
                        "description": "Another path of the allow-list (README, "
                        "Exposure): `responses`, `score`, `rerank`, `audio/transcriptions`..."
                        " Others get 404 unless `VLLM_WRAPPER_EXTRA_PATHS` or "
                        "`VLLM_WRAPPER_PROXY_ALL` widen it; LoRA admin paths are refused "
                        "unless `VLLM_WRAPPER_ALLOW_ADMIN=true`. `tokenize` and `detokenize` "
                        "reach vLLM's root, where it serves them. What vLLM answers depends "
                        "on its model: `embeddings`, `score` and `rerank` need a pooling "
                        "model, `audio/*` a speech model; vLLM 0.32 has no `models/{id}`.",
                        "schema": {"type": "string"},
                    }
                ],
                "get": _passthrough("Any other vLLM endpoint (GET)", "get"),
                "post": _passthrough("Any other vLLM endpoint (POST)", "post"),
            },
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
    }
    doc["paths"].update(_conversation_paths())
    if settings.wrapper_api_key:
        doc["security"] = [{"bearerAuth": []}]
    if root_path:
        doc["servers"] = [{"url": root_path, "description": "this gateway"}]
    return doc


_ROLES = ["system", "user", "assistant", "tool"]
_SCHEMAS: dict[str, Any] = {
    "Message": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": _ROLES},
            "content": {
                "description": "Text, or OpenAI content parts",
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
            },
        },
        "additionalProperties": True,
    },
    "ChatRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/components/schemas/Message"},
            },
            "model": {"type": "string", "description": "Default: `VLLM_MODEL`"},
            "max_tokens": {
                "type": "integer",
                "minimum": 1,
                "description": "Default: `VLLM_DEFAULT_MAX_TOKENS`",
            },
            "temperature": {
                "type": "number",
                "minimum": 0,
                "maximum": 2,
                "description": "Default: `VLLM_DEFAULT_TEMPERATURE`",
            },
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "stream": {"type": "boolean", "default": False},
            "conversation_id": {
                "type": "string",
                "description": "Continue this stored conversation (see /conversations)",
            },
            "store": {
                "type": "boolean",
                "description": "Start a stored conversation; its id comes back",
            },
        },
        "additionalProperties": True,
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    },
    "ChatResponse": {
        "type": "object",
        "required": ["content", "model", "usage", "finish_reason"],
        "properties": {
            "content": {"type": "string"},
            "model": {"type": "string"},
            "usage": {"$ref": "#/components/schemas/Usage"},
            "finish_reason": {
                "type": ["string", "null"],
                "description": "`stop`, `length`...",
            },
            "conversation_id": {
                "type": "string",
                "description": "With `conversation_id` or `store: true` in the request",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "vllm_available", "model", "base_url"],
        "properties": {
            "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
            "vllm_available": {"type": "boolean"},
            "model": {"type": "string"},
            "base_url": {"type": "string"},
            "upstreams": {
                "description": "With many upstreams or a config file: each one's state",
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "url": {"type": "string"},
                        "healthy": {"type": "boolean"},
                        "in_flight": {"type": "integer"},
                        "weight": {"type": "integer"},
                        "models": {"type": ["array", "null"], "items": {"type": "string"}},
                        "last_error": {"type": ["string", "null"]},
                        "load": {"type": ["object", "null"]},
                    },
                },
            },
            "reason": {
                "type": "string",
                "description": "Only when unhealthy: why, in a few words (e.g. `upstream "
                "answered 401: it refused the gateway's credentials (check VLLM_API_KEY)`).",
            },
        },
    },
    "ModelList": {
        "type": "object",
        "properties": {
            "object": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "integer", "null"]},
                },
            }
        },
    },
}


_CONVERSATION = {
    "id": "conv_018f2b3c4d5e7a1b2c3d4e5f60718293",
    "object": "conversation",
    "created_at": 1764532800,
    "updated_at": 1764532860,
    "metadata": {"topic": "demo"},
    "message_count": 1,
}
_NOT_FOUND = _error("No such conversation for this key (or it expired)")


def _conversation_paths() -> dict[str, Any]:
    """``/conversations`` and ``/conversations/{conversation_id}``."""
    tags = ["Conversations"]
    with_messages = {**_CONVERSATION, "messages": [{"role": "system", "content": "Be brief."}]}
    conv_id = {
        "name": "conversation_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^conv_[0-9a-f]{32}$"},
    }
    return {
        "/conversations": {
            "post": {
                "tags": tags,
                "summary": "Start a conversation (optionally with messages, e.g. a system prompt)",
                "description": "Then send turns with `POST /chat` and its `conversation_id`. "
                "History is stored server-side, shared by every replica, trimmed to the "
                "model's context when sent, and expires after `[history] ttl_days`.",
                "requestBody": {
                    "required": False,
                    "content": _json(
                        {"$ref": "#/components/schemas/ConversationCreate"},
                        {
                            "messages": [{"role": "system", "content": "Be brief."}],
                            "metadata": {"topic": "demo"},
                        },
                    ),
                },
                "responses": {
                    "200": {
                        "description": "The new conversation",
                        "content": _json(
                            {"$ref": "#/components/schemas/Conversation"}, with_messages
                        ),
                    },
                    "400": _ERRORS["400"],
                    "401": _ERRORS["401"],
                },
            },
            "get": {
                "tags": tags,
                "summary": "The caller's conversations, newest first",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "The `last_id` of the previous page",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "One page",
                        "content": _json(
                            {"type": "object"},
                            {
                                "object": "list",
                                "data": [_CONVERSATION],
                                "first_id": _CONVERSATION["id"],
                                "last_id": _CONVERSATION["id"],
                                "has_more": False,
                            },
                        ),
                    },
                    "400": _ERRORS["400"],
                    "401": _ERRORS["401"],
                },
            },
        },
        "/conversations/{conversation_id}": {
            "parameters": [conv_id],
            "get": {
                "tags": tags,
                "summary": "One conversation with its messages",
                "responses": {
                    "200": {
                        "description": "The conversation",
                        "content": _json(
                            {"$ref": "#/components/schemas/Conversation"}, with_messages
                        ),
                    },
                    "401": _ERRORS["401"],
                    "404": _NOT_FOUND,
                },
            },
            "delete": {
                "tags": tags,
                "summary": "Delete a conversation",
                "responses": {
                    "200": {
                        "description": "Deleted",
                        "content": _json(
                            {"type": "object"},
                            {
                                "id": _CONVERSATION["id"],
                                "object": "conversation.deleted",
                                "deleted": True,
                            },
                        ),
                    },
                    "401": _ERRORS["401"],
                    "404": _NOT_FOUND,
                },
            },
        },
    }


_SCHEMAS.update(
    {
        "ConversationCreate": {
            "type": "object",
            "properties": {
                "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                "metadata": {
                    "type": "object",
                    "maxProperties": 16,
                    "additionalProperties": {"type": "string", "maxLength": 512},
                },
            },
            "additionalProperties": False,
        },
        "Conversation": {
            "type": "object",
            "required": ["id", "object", "created_at", "updated_at", "metadata"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["conversation"]},
                "created_at": {"type": "integer"},
                "updated_at": {"type": "integer"},
                "metadata": {"type": "object"},
                "message_count": {"type": "integer"},
                "messages": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Message"},
                    "description": "Only when reading one conversation",
                },
            },
        },
    }
)
