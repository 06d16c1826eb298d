"""The gateway's exception tree and OpenAI-shaped error responses.

::

    GatewayError                  status  type
    ├── ClientError                 4xx   invalid_request_error (bad input, sent by the client)
    │   ├── BadRequest              400
    │   ├── Unauthorized            401   authentication_error
    │   ├── Forbidden               403   permission_error
    │   │   └── ModelNotAllowed     403   (code model_not_allowed: the key's models list)
    │   ├── NotFound                404
│   │   └── ModelNotFound       404   model_not_found (no upstream serves the model)
    │   ├── RequestTimeout          408   (request body too slow)
    │   ├── PayloadTooLarge         413
    │   ├── URITooLong              414
    │   ├── HeadersTooLarge         431
    │   └── RateLimited             429   requests | tokens (code rate_limit_exceeded)
    │       └── QuotaExceeded       429   insufficient_quota (not retryable)
    ├── StateUnavailableError       503   state_unavailable ([state] on_error = "closed")
    └── UpstreamError               5xx   (the upstream failed us; raised by proxy.upstream)
        ├── UpstreamUnavailable     503   connection refused/reset, or 502/503/429 after retries
        │   └── PoolExhausted       503   no free upstream connection in time
        ├── UpstreamTimeout         504   connect or read timeout
        ├── UpstreamProtocolError   502   the upstream sent something that is not HTTP
        └── UpstreamAuthRefused     502   the upstream refused the gateway's VLLM_API_KEY
                                          (on the gateway's own /chat and /models)

Low-level ``httpx`` exceptions are translated into ``UpstreamError`` in one
place, :mod:`proxy.upstream`. Everything is rendered by :func:`error_body`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from proxy.asgi import Scope, Send

HeaderList = list[tuple[bytes, bytes]]


class GatewayError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: HeaderList = list(headers)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    async def send(self, send: Send, extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        await send_json(send, self.status, self.body(), [*self.headers, *extra_headers])


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"


class BadRequest(ClientError):
    status = 400
    code = "bad_request"


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class URITooLong(ClientError):
    status = 414
    code = "uri_too_long"


class HeadersTooLarge(ClientError):
    status = 431
    code = "request_headers_too_large"


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class RateLimited(ClientError):
    """429 for rpm / tpm / max_parallel; ``type`` is ``requests`` or ``tokens`` (as OpenAI)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, type: str = "requests", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.type = type


class QuotaExceeded(RateLimited):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(message, type="insufficient_quota", **kw)


class StateUnavailableError(GatewayError):
    status = 503
    type = "server_error"
    code = "state_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    retryable = False


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"
    retryable = True


class PoolExhausted(UpstreamUnavailable):
    code = "upstream_pool_exhausted"
    retryable = False


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    retryable = True


class UpstreamProtocolError(UpstreamError):
    status = 502
    code = "upstream_protocol_error"


class UpstreamAuthRefused(UpstreamError):
    """A 401/403 from the upstream: about the gateway's key, never the client's (which is
    not forwarded), so the client must not read it as its own key being wrong."""

    status = 502
    code = "upstream_auth_refused"

    @classmethod
    def for_status(cls, status: int) -> UpstreamAuthRefused:
        return cls(
            f"the upstream refused the gateway's credentials (it answered {status}): the "
            "gateway's VLLM_API_KEY is missing or wrong. This is not about your API key."
        )


def _status_codes() -> dict[int, str]:
    codes = {cls.status: cls.code for cls in ClientError.__subclasses__() if cls.code}
    codes[422] = "invalid_request"
    codes[429] = "rate_limit_exceeded"
    return codes


_STATUS_CODES = _status_codes()


def upstream_error(status: int, body: bytes) -> tuple[str, str, str | None, str]:
    """An upstream's error answer as ``(message, type, param, code)``, ``code`` a string.

    vLLM's own ``{"error": {"message", "type", "param", "code"}}`` keeps its message, type
    and param; FastAPI's ``{"detail": ...}`` and vLLM's auth ``{"error": "..."}`` give their
    text (not JSON inside a string); anything else its first 1000 characters.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    param = None
    message = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            kind = str(error.get("type") or kind)
            param = error.get("param") if isinstance(error.get("param"), str) else None
        elif isinstance(error, str):
            message = error
        elif isinstance(parsed.get("detail"), str):
            message = parsed["detail"]
    if not isinstance(message, str) or not message:
        text = body.decode("utf-8", "replace").strip()[:1000]
        message = text or f"upstream answered {status}"
    code = _STATUS_CODES.get(status) or (
        "upstream_error" if status >= 500 else "upstream_client_error"
    )
    return message, kind, param, code


def error_body(
    message: str, type: str, code: str | int | None = None, param: str | None = None
) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` as bytes."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete ``application/json`` response through a raw ASGI ``send``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def deny_websocket(
    scope: Scope, send: Send, exc: GatewayError, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Refuse a WebSocket handshake with ``exc`` as an HTTP answer (its status and body).

    Uses the ASGI ``websocket.http.response`` extension (uvicorn, hypercorn); a server
    without it gets a close before accept, which it turns into a plain 403.
    """
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = exc.body()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *exc.headers,
                *headers,
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})
