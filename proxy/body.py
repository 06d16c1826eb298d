"""Reading a request body whole, bounded in size and time, and watching for client disconnect."""

from __future__ import annotations

import asyncio

from proxy.asgi import Receive, Scope
from proxy.errors import BadRequest, HeadersTooLarge, PayloadTooLarge, RequestTimeout, URITooLong
from proxy.headers import get_all, headers_size


class ClientDisconnected(Exception):
    """The client went away (a normal outcome, logged at debug level)."""


def check_head(scope: Scope, *, limit: int) -> None:
    """Refuse a request whose headers (431) or target (414) exceed ``limit`` bytes.

    uvicorn's httptools parser sets no limit of its own, so this keeps such a
    request from being relayed (or its headers held for the whole retry loop).
    """
    if headers_size(scope["headers"]) > limit:
        raise HeadersTooLarge(f"request headers are larger than the limit of {limit} bytes")
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
    if target > limit:
        raise URITooLong(f"request target is longer than the limit of {limit} bytes")


async def read_body(scope: Scope, receive: Receive, *, limit: int, timeout: float) -> bytes:
    """The whole request body (so it can be replayed on retry).

    Raises :class:`PayloadTooLarge` above ``limit`` bytes (early, from
    ``Content-Length``, when the client declares it), :class:`RequestTimeout`
    when the body takes longer than ``timeout`` seconds, and
    :class:`ClientDisconnected` if the client leaves first.
    """
    lengths = get_all(scope["headers"], b"content-length")
    if lengths:
        if len(set(lengths)) > 1 or not lengths[0].isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(lengths[0]) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
                if not message.get("more_body", False):
                    if not parts:
                        return chunk
                    parts.append(chunk)
                    break
                parts.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout:g} s") from None
    return b"".join(parts)


async def wait_disconnect(receive: Receive) -> None:
    """After the body is read: return when ``http.disconnect`` arrives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
