"""Reading a request body whole, bounded in size and time, and watching for client disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.asgi import Receive, Scope
from proxy.errors import BadRequest, HeadersTooLarge, PayloadTooLarge, RequestTimeout, URITooLong
from proxy.headers import get_all, headers_size

# The scope key under which the gateway's server protocol (proxy.server) puts the
# request's cycle, so a handler is told of a disconnect by a callback
# (:func:`on_disconnect`) instead of keeping a task blocked in ``receive()`` for it.
DISCONNECT_HOOK = "vllm_wrapper.cycle"


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


def on_disconnect(scope: Scope, callback: Callable[[], None] | None) -> bool:
    """Have ``callback`` called (once, from the event loop) when the client of the
    request ``scope`` disconnects before its response is complete; ``None`` stops it.

    Returns False when the server is not the gateway's own protocol (a mounted gateway,
    another server): then the caller watches ``receive()`` (:func:`wait_disconnect`).
    A client already gone is reported at once (soon, by the loop).
    """
    cycle = scope.get(DISCONNECT_HOOK)
    if cycle is None:
        return False
    if callback is not None and cycle.disconnected and not cycle.response_complete:
        asyncio.get_running_loop().call_soon(callback)
        return True
    cycle.on_lost = callback
    return True
