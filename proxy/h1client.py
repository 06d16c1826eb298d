"""A lean HTTP/1.1 client for one upstream: a connection pool on asyncio Protocols.

Responses are parsed by ``httptools`` (llhttp, in C; uvicorn[standard] ships it). The
pool keeps what the gateway relies on and nothing more:

- at most ``max_connections`` connections in use; a request that finds none free
  within ``pool_timeout`` raises :class:`PoolFull`;
- idle connections are reused (last in, first out) until ``keepalive`` seconds idle;
- a connection that receives bytes while idle, or a response it did not ask for, is
  closed and never reused (a late answer must not reach the next request);
- a response whose body was not read to its end closes its connection (vLLM aborts
  the generation when the connection closes);
- a request that fails on a reused connection before any response byte (the server
  had closed it) is sent again once on a fresh connection, for idempotent methods
  only, as aiohttp does; a POST is left to the retry policy.

Errors (the tree :mod:`proxy.upstream` maps to the gateway's)::

    ClientError
    ├── ConnectError      TCP/TLS connect failed (refused, DNS...): host, port, os_error
    ├── ConnectTimeout    TCP/TLS connect took longer than connect_timeout (a TimeoutError)
    ├── PoolFull          no connection came free within pool_timeout (a TimeoutError)
    ├── Disconnected      the server closed the connection before any response byte
    ├── BrokenConnection  reset, or closed mid-response
    └── BadResponse       an unparsable status line, header or body framing

A read timeout (nothing received for ``timeout`` seconds, while waiting for the head
or between body reads) is the builtin :class:`TimeoutError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools

log = logging.getLogger(__name__)

# Pause reading a response once this much body is buffered and not yet read.
_HIGH_WATER = 256 * 1024
_DNS_TTL = 10.0
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Methods that get no ``content-length: 0`` when they carry no body (aiohttp's GET_METHODS).
_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"CONNECT"})


class ClientError(Exception):
    """Base of the client's errors."""


class ConnectError(ClientError):
    """The TCP (or TLS) connect failed."""

    def __init__(self, host: str, port: int, os_error: BaseException) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {os_error}")
        self.host = host
        self.port = port
        self.os_error = os_error


class ConnectTimeout(ClientError, TimeoutError):
    """The TCP (or TLS) connect did not complete within the connect timeout."""


class PoolFull(ClientError, TimeoutError):
    """No pooled connection came free within the timeout."""


class Disconnected(ClientError):
    """The server closed the connection before sending any byte of the response."""


class BrokenConnection(ClientError):
    """The connection broke (reset, or closed before the response was complete)."""


class BadResponse(ClientError):
    """The response could not be parsed."""


class Origin:
    """``scheme://host:port`` of an upstream: where to connect and what ``Host`` says."""

    __slots__ = ("host", "host_header", "ip", "key", "port", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname  # IPv6 literals without brackets
        default = 443 if self.tls else 80
        self.port = parts.port or default
        try:
            ipaddress.ip_address(self.host)
            self.ip = True
        except ValueError:
            self.ip = False
        shown = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != default:
            shown += f":{self.port}"
        self.host_header = shown.encode("idna" if not self.ip else "ascii")
        self.key = (parts.scheme, self.host, self.port)


def _expire(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Response:
    """A response whose head has arrived; its body arrives through :meth:`readany`."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_paused",
        "_timeout",
        "_waiter",
        "done",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, status: int, headers: list, timeout: float) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self._timeout = timeout
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.done = False  # the whole body has arrived

    # -- fed by the connection ------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._buffered > _HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause()

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._error = error
        else:
            self.done = True
        if self._paused:  # the connection may serve another request: read again
            self._paused = False
            if self._conn is not None:
                self._conn.resume()
        self._conn = None  # the connection went back to the pool, or closed
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the caller --------------------------------------------------------------

    async def readany(self) -> bytes:
        """The body bytes received since the last call (waits for some); ``b""`` at the end.

        Raises :class:`TimeoutError` when nothing arrives for ``timeout`` seconds, or the
        :class:`ClientError` that ended the connection.
        """
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    if self._conn is not None:
                        self._conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_at(loop.time() + self._timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def close(self) -> None:
        """End the exchange: a body not received whole closes its connection. Never suspends."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.close()


class _Connection(asyncio.Protocol):
    """One pooled connection: feeds httptools, hands the head and body to the exchange."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle = False
        self.in_use = True
        self.idle_since = 0.0
        self.uses = 0
        self.reusable = True
        # the exchange in progress
        self.head: asyncio.Future[Response] | None = None
        self.response: Response | None = None
        self.head_only = False  # a HEAD request: the answer has no body, whatever it says
        self.read_timeout = 0.0
        self.received = False  # any byte of this exchange's response
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.framed = False  # content-length or chunked: EOF before the end is an error

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle or (self.head is None and self.response is None):
            log.warning("upstream wrote %d bytes on an idle connection; closing it", len(data))
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reusable = False  # 101: the rest is not HTTP; the head went out already
        except httptools.HttpParserCallbackError as exc:
            self._fail(exc.__context__ or BadResponse(str(exc)))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(str(exc) or type(exc).__name__))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.head is not None and not self.head.done():
            if exc is None and not self.received:
                self.head.set_exception(Disconnected("server disconnected"))
            else:
                self.head.set_exception(BrokenConnection(_reason(exc, "server disconnected")))
            self.head = None
        response = self.response
        if response is not None:
            self.response = None
            if exc is None and not self.framed:
                response._finish()  # a body delimited by the end of the connection
            else:
                text = _reason(exc, "response payload is not complete")
                response._finish(BrokenConnection(text))
        self.pool._lost(self)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head is None:  # a second response to one request
            raise BadResponse("a response nobody asked for")
        self.headers = []
        self.framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim answer (100 Continue...): the final one follows
        head = self.head
        self.head = None
        response = Response(self, status, self.headers, self.read_timeout)
        self.headers = []  # trailers after a chunked body land here, never in the head
        if status == 101:
            self.reusable = False
        if self.head_only:
            # llhttp cannot be told a HEAD answer has no body: the exchange ends here and
            # this parser (which may wait for content-length bytes) is replaced.
            self.parser = httptools.HttpResponseParser(self)
            self.framed = True
            response._finish()
            self._release()
        else:
            self.response = response
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        if self.status_is_interim():
            return
        response = self.response
        if response is None:
            return
        self.response = None
        response._finish()
        if not self.parser.should_keep_alive():
            self.reusable = False
        self._release()

    def status_is_interim(self) -> bool:
        status = self.parser.get_status_code()
        return 100 <= status < 200 and status != 101

    # -- the exchange --------------------------------------------------------------------

    async def exchange(self, request: bytes, timeout: float, head_only: bool) -> Response:
        """Write ``request`` (head and body) and wait for the response head."""
        if self.closed or self.transport is None:
            raise Disconnected("server disconnected")
        loop = asyncio.get_running_loop()
        head = self.head = loop.create_future()
        self.head_only = head_only
        self.read_timeout = timeout
        self.received = False
        self.uses += 1
        self.transport.write(request)
        timer = loop.call_at(loop.time() + timeout, _expire, head)
        try:
            return await head
        except BaseException:
            self.head = None
            self.close()
            raise
        finally:
            timer.cancel()

    def _fail(self, error: BaseException) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
            self.head = None
        response = self.response
        if response is not None:
            self.response = None
            response._finish(error)
        self.close()

    def _release(self) -> None:
        """The response has arrived whole: back to the pool, or closed."""
        self.pool._release(self, self.reusable)

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now; the slot it held in the pool comes free."""
        if self.transport is not None:
            self.transport.close()
        self.closed = True
        self.pool._release(self, False)


def _reason(exc: BaseException | None, default: str) -> str:
    if exc is None:
        return default
    return str(exc) or type(exc).__name__


class Pool:
    """Connections to one upstream (any origin it names), at most ``max_connections`` in use.

    ``pool_timeout`` bounds waiting for a free slot plus connecting; ``connect_timeout``
    bounds the TCP (and TLS) connect alone; ``keepalive`` is how long an idle connection
    may be reused (0: never).
    """

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive: float,
        connect_timeout: float,
        pool_timeout: float,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self.in_use = 0
        self._idle: dict[tuple, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._dns: dict[tuple[str, int], tuple[float, list]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def request(
        self,
        method: bytes,
        origin: Origin,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
        extra: bytes = b"",
    ) -> Response:
        """Send one request; return once the response head is in (body not yet read).

        ``extra``: header lines to add, already rendered (``name: value\\r\\n``)."""
        lines = [method, b" ", target, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if body or method not in _NO_BODY_METHODS:
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(extra)
        lines.append(b"\r\n")
        lines.append(body)
        request = b"".join(lines)
        head_only = method == b"HEAD"
        again = method in _IDEMPOTENT
        while True:
            conn = await self._acquire(origin)
            reused = conn.uses > 0
            try:
                return await conn.exchange(request, timeout, head_only)
            except (Disconnected, BrokenConnection):
                if again and reused and not conn.received:
                    again = False  # the server had closed the kept-alive connection
                    continue
                raise

    # -- the pool ------------------------------------------------------------------------

    async def _acquire(self, origin: Origin) -> _Connection:
        if self.closed:
            raise BrokenConnection("the client is closed")
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            idle = self._idle.get(origin.key)
            if idle:
                now = loop.time()
                while idle:
                    conn = idle.pop()
                    if conn.closed or now - conn.idle_since > self.keepalive:
                        conn.close()
                        continue
                    conn.idle = False
                    conn.in_use = True
                    self.in_use += 1
                    return conn
            if self.in_use < self.max_connections:
                self.in_use += 1
                try:
                    conn = await self._connect(origin)
                except BaseException:
                    self.in_use -= 1
                    self._wake()
                    raise
                self._all.add(conn)
                return conn
            if deadline is None:
                deadline = loop.time() + self.pool_timeout
            await self._wait(loop, deadline)

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if loop.time() >= deadline:
            raise PoolFull(f"all {self.max_connections} connections are in use")
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise PoolFull(f"all {self.max_connections} connections are in use") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._wake()  # woken and cancelled at once: pass the turn on
            raise
        finally:
            timer.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses = await self._resolve(loop, origin)
                error: BaseException | None = None
                for family, address in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self, origin),
                            host=address,
                            port=origin.port,
                            family=family,
                            ssl=context,
                            server_hostname=origin.host if context is not None else None,
                        )
                        return conn
                    except OSError as exc:
                        error = exc
                assert error is not None
                raise ConnectError(origin.host, origin.port, error)
        except TimeoutError:
            raise ConnectTimeout(
                f"connect to {origin.host}:{origin.port} timed out after {self.connect_timeout:g} s"
            ) from None

    async def _resolve(
        self, loop: asyncio.AbstractEventLoop, origin: Origin
    ) -> list[tuple[int, str]]:
        if origin.ip:
            family = socket.AF_INET6 if ":" in origin.host else socket.AF_INET
            return [(family, origin.host)]
        key = (origin.host, origin.port)
        cached = self._dns.get(key)
        now = loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = await loop.getaddrinfo(
                origin.host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except OSError as exc:
            raise ConnectError(origin.host, origin.port, exc) from exc
        addresses = []
        for family, _type, _proto, _name, sockaddr in infos:
            if (family, sockaddr[0]) not in addresses:
                addresses.append((family, sockaddr[0]))
        self._dns[key] = (now + _DNS_TTL, addresses)
        return addresses

    def _release(self, conn: _Connection, reuse: bool) -> None:
        """``conn`` no longer serves a request: pool it (``reuse``) or close it; wake a waiter."""
        if not conn.in_use:
            return
        conn.in_use = False
        self.in_use -= 1
        if reuse and not conn.closed and not self.closed and self.keepalive > 0:
            conn.idle = True
            loop = asyncio.get_running_loop()
            conn.idle_since = loop.time()
            self._idle.setdefault(conn.origin.key, []).append(conn)
            if self._sweeper is None:
                self._sweeper = loop.call_later(self.keepalive, self._sweep)
        elif not conn.closed:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        self._wake()

    def _lost(self, conn: _Connection) -> None:
        self._all.discard(conn)
        self._release(conn, False)

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive time."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        left = False
        for idle in self._idle.values():
            keep = [c for c in idle if not c.closed and now - c.idle_since <= self.keepalive]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            idle[:] = keep
            left = left or bool(keep)
        if left:
            self._sweeper = asyncio.get_running_loop().call_later(self.keepalive, self._sweep)

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(BrokenConnection("the client is closed"))
        await asyncio.sleep(0)  # let the transports close
