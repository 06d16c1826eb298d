"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools protocol, bounded.

uvicorn's :class:`~uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` reads a
request head with no size limit and no time limit, holds a new connection that
sends nothing forever, and appends chunked-body trailers to the request's header
list. :class:`BoundedHttpProtocol` closes those holes where the bytes arrive, before
the app sees anything:

- a head (request line and headers) larger than ``max_head_bytes`` is answered 431
  and the connection closed while it arrives, so memory stays bounded by the limit
  (plus one socket read);
- a head not complete ``head_timeout`` seconds after its first byte is answered 408
  and closed; a new connection that sends nothing within ``head_timeout`` is closed;
- trailers of a chunked request body are dropped (never headers: not for auth, not
  forwarded), and more than ``max_head_bytes`` of them close the connection;
- an ``Upgrade`` the gateway does not speak (``h2c``) on a request with a body is
  refused with 400, since the parser stops at the upgrade and the body would be lost;
- a client that stops reading a response for ``send_timeout`` seconds (the socket's
  buffers full, writing paused) is disconnected, so the request ends and its
  upstream request is closed (vLLM aborts the generation).

Per read it adds two integer comparisons, per request a clock read (one head timer per
connection at a time, re-armed at most once per timeout); bench/RESULTS.md
has the CPU measurement that chose this over uvicorn's pure-Python ``h11`` protocol.

:class:`HttpLimits` is the picklable factory uvicorn is given as ``http=`` (it is
copied into each ``--workers`` process).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from proxy.body import DISCONNECT_HOOK
from proxy.errors import BadRequest, ClientError, HeadersTooLarge, RequestTimeout, URITooLong
from proxy.headers import headers_size

# Transfer-Encoding or a non-zero Content-Length: the request has a body.
_NO_BODY = (b"0", b"")
# After a refusal the connection is half-closed and what the client still sends is read
# and dropped for this long (nginx's lingering close), so it sees the answer, not a reset.
LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What bounds a client's request head; called by uvicorn to make each connection's
    protocol."""

    max_head_bytes: int = 64 * 1024
    head_timeout: float = 10.0
    send_timeout: float = 60.0

    def __call__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> BoundedHttpProtocol:
        return BoundedHttpProtocol(config, server_state, app_state, _loop, limits=self)


# The default limits, for ``uvicorn proxy:app --http proxy.server:bounded``.
bounded = HttpLimits()


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head and no trailers."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head_bytes = limits.max_head_bytes
        self.head_timeout = limits.head_timeout
        self.send_timeout = limits.send_timeout
        self.in_head = True  # between two messages, or inside a head
        self.head_started: float | None = None  # loop time the head in progress began
        self.head_bytes = 0  # bytes read since the head began (at most one read too many)
        self.feeding = 0  # size of the read being parsed
        self.in_trailers = False
        self.trailer_bytes = 0
        self.refused = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.send_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None

    # -- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Also the idle timeout of a new connection: it must send a head in time.
        self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.send_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.send_timer = self.linger_timer = None
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:
            callback = getattr(cycle, "on_lost", None)
            if callback is not None:
                cycle.on_lost = None
                callback()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering after a refusal: read and drop
        counting_head = self.in_head
        counting_trailers = self.in_trailers
        self.feeding = len(data)
        super().data_received(data)
        if self.refused or self.transport.is_closing():
            return
        if counting_head and self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > self.max_head_bytes:
                limit = self.max_head_bytes
                self._refuse(
                    HeadersTooLarge(f"request head is larger than the limit of {limit} bytes")
                )
        elif counting_trailers and self.in_trailers:
            self.trailer_bytes += len(data)
            if self.trailer_bytes > self.max_head_bytes:
                self._refuse(None)  # a response may be under way: just close

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        super().resume_writing()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_started = self.loop.time()
        self.head_bytes = 0
        self.in_trailers = False
        self.trailer_bytes = 0
        if self.head_timer is None:
            # One timer at a time per connection: on keep-alive it is re-armed at most
            # once per head_timeout, not per request.
            self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_started = None
        limit = self.max_head_bytes
        # A head that came in one read was not counted in data_received.
        if (
            self.head_bytes + self.feeding > limit
            and len(self.url) + headers_size(self.headers) > limit
        ):
            self._refuse(
                URITooLong(f"request target is longer than the limit of {limit} bytes")
                if len(self.url) > limit
                else HeadersTooLarge(f"request head is larger than the limit of {limit} bytes")
            )
            return
        if self.parser.should_upgrade():
            if self._should_upgrade():  # a WebSocket: its own protocol takes over
                self._cancel_head_timer()
            elif self._has_body():
                # The parser stops at an upgrade, so the body would be lost: refuse instead.
                self._refuse(
                    BadRequest(
                        "Upgrade is not supported on a request with a body; "
                        "send it without the Upgrade header",
                        code="unsupported_upgrade",
                    )
                )
                return
            super().on_headers_complete()
            return
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            cycle.__class__ = HeadWithBodyCycle  # its task has not run yet
            self.scope[DISCONNECT_HOOK] = cycle  # type: ignore[literal-required]
        # The scope has its headers; chunked-body trailers, which uvicorn's on_header
        # appends to the same list, now go to a list nobody reads.
        self.headers = []

    def on_body(self, body: bytes) -> None:
        self.in_trailers = False
        if not self.refused:
            super().on_body(body)

    def on_chunk_header(self) -> None:
        # Every chunk starts here; the last (empty) one is followed by the trailers.
        self.in_trailers = True

    def on_message_complete(self) -> None:
        self.in_trailers = False
        self.in_head = True
        self.head_bytes = 0
        if not self.refused:
            super().on_message_complete()

    # -- timeouts and refusals ------------------------------------------------------------

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (
                name == b"content-length" and value.strip() not in _NO_BODY
            ):
                return True
        return False

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.refused or self.transport.is_closing():
            return
        if self.head_started is None:
            if self.cycle is None:
                self.transport.close()  # a new connection that sent nothing: no answer
            # else: between requests (uvicorn's keep-alive timeout) or in a body
            return
        left = self.head_started + self.head_timeout - self.loop.time()
        if left > 0:  # this head began after the timer was set
            self.head_timer = self.loop.call_later(left, self._head_timed_out)
        elif self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still going out: close after it.
            self.cycle.keep_alive = False
        else:
            self._refuse(
                RequestTimeout(f"request head not received within {self.head_timeout:g} s")
            )

    def _send_timed_out(self) -> None:
        self.send_timer = None
        self.logger.info("client read nothing for %g s; disconnecting it", self.send_timeout)
        self.transport.abort()  # close() would wait for the buffer to drain: never

    def _refuse(self, error: ClientError | None) -> None:
        """Answer ``error`` (when no response is under way) and close the connection."""
        self.refused = True
        self._cancel_head_timer()
        if error is None or (self.cycle is not None and not self.cycle.response_complete):
            self.transport.close()  # a response is going out: nothing else can be said
            return
        body = error.body()
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        transport = self.transport
        transport.write(b"".join(head) + body)
        if transport.can_write_eof():
            transport.write_eof()
            self.linger_timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()
        self.logger.info("refused a request: %d %s", error.status, error.message)


class _Held:
    """Stands in for the transport while uvicorn writes a response head: keeps it."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _Prefixed:
    """Stands in for the transport for one body message: the held head goes first, in
    the same write."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data if head else data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HeadWithBodyCycle(RequestResponseCycle):
    """uvicorn's request cycle, but a response with a ``Content-Length`` goes out in
    one write (head and body together, as nginx's ``writev``), not two: one system
    call and one wake-up of the client fewer per non-streamed answer. A streamed
    (chunked) response's head is written at once, as before, so a client sees the
    status before the first token."""

    held: bytes | None = None

    async def send(self, message: Any) -> None:
        if not self.response_started and message["type"] == "http.response.start":
            transport = self.transport
            self.transport = holder = _Held()  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            if (
                holder.data
                and self.chunked_encoding is False
                and self.scope["method"] != "HEAD"
                and not self.disconnected
            ):
                self.held = holder.data  # written with the first body message
            elif holder.data:
                transport.write(holder.data)
            return
        held = self.held
        if held is None:
            await super().send(message)
            return
        self.held = None
        transport = self.transport
        self.transport = prefixed = _Prefixed(transport, held)  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
        if prefixed.head and not self.disconnected and not transport.is_closing():
            transport.write(prefixed.head)  # the message wrote nothing: the head still goes
