"""The gateway's exception tree and OpenAI-shaped error responses.

::

    GatewayError                  status  type
    ├── ClientError                 4xx   invalid_request_error (bad input, sent by the client)
    │   ├── BadRequest              400
    │   ├── Unauthorized            401   authentication_error
    │   ├── Forbidden               403   permission_error
    │   ├── NotFound                404
    │   ├── RequestTimeout          408   (request body too slow)
    │   ├── PayloadTooLarge         413
    │   ├── URITooLong              414
    │   └── HeadersTooLarge         431
    └── UpstreamError               5xx   (the upstream failed us; raised by proxy.upstream)
        ├── UpstreamUnavailable     503   connection refused/reset, or 502/503/429 after retries
        │   └── PoolExhausted       503   no free upstream connection in time
        ├── UpstreamTimeout         504   connect or read timeout
        └── UpstreamProtocolError   502   the upstream sent something that is not HTTP

Low-level ``httpx`` exceptions are translated into ``UpstreamError`` in one
place, :mod:`proxy.upstream`. Everything is rendered by :func:`error_body`.
"""

from __future__ import annotations

from collections.abc import Iterable

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
