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

Per read it adds two integer comparisons, per request one timer; bench/RESULTS.md
has the CPU measurement that chose this over uvicorn's pure-Python ``h11`` protocol.

:class:`HttpLimits` is the picklable factory uvicorn is given as ``http=`` (it is
copied into each ``--workers`` process).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

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
        self.send_timer: asyncio.TimerHandle | None = None
        self.in_head = True  # between two messages, or inside a head
        self.head_started = False
        self.head_bytes = 0  # bytes read since the head began (at most one read too many)
        self.in_trailers = False
        self.trailer_bytes = 0
        self.refused = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None

    # -- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Also the idle timeout of a new connection: it must send a head in time.
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        counting_head = self.in_head
        counting_trailers = self.in_trailers
        super().data_received(data)
        if self.refused or self.transport.is_closing():
            return
        if counting_head and self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > self.max_head_bytes:
                self._refuse(
                    HeadersTooLarge(
                        f"request head is larger than the limit of {self.max_head_bytes} bytes"
                    )
                )
        elif counting_trailers and self.in_trailers:
            self.trailer_bytes += len(data)
            if self.trailer_bytes > self.max_head_bytes:
                self._refuse(None)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _cancel_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_timed_out(self) -> None:
        self.send_timer = None
        self.logger.info("client read nothing for %g s; disconnecting it", self.send_timeout)
        self.transport.abort()  # close() would wait for the buffer to drain: never

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_started = True
        self.head_bytes = 0
        self.in_trailers = False
        self.trailer_bytes = 0
        if self.head_timer is None:
            self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # A trailer of a chunked body: never a header. Counted, then dropped.
            self.trailer_bytes += len(name) + len(value)
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_started = False
        self._cancel_head_timer()
        if len(self.url) + headers_size(self.headers) > self.max_head_bytes:
            # The whole head came in one read, so the count in data_received missed it.
            limit = self.max_head_bytes
            self._refuse(
                URITooLong(f"request target is longer than the limit of {limit} bytes")
                if len(self.url) > limit
                else HeadersTooLarge(f"request head is larger than the limit of {limit} bytes")
            )
            return
        if self.parser.should_upgrade() and not self._should_upgrade() and self._has_body():
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

    # -- refusing -----------------------------------------------------------------------

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (
                name == b"content-length" and value.strip() not in _NO_BODY
            ):
                return True
        return False

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still going out: let it finish, then close.
            self.cycle.keep_alive = False
            return
        if self.head_started or self.head_bytes:
            self._refuse(
                RequestTimeout(f"request head not received within {self.head_timeout:g} s")
            )
        else:
            self.transport.close()  # idle: nothing to answer

    def _refuse(self, error: ClientError | None) -> None:
        """Answer ``error`` (when no response is under way) and close the connection."""
        self.refused = True
        self._cancel_head_timer()
        if error is None or (self.cycle is not None and not self.cycle.response_complete):
            self.transport.close()  # a response is going out: nothing else can be said
            return
        self._answer_and_close(error)

    def _answer_and_close(self, error: ClientError) -> None:
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
