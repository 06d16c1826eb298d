"""A lean Redis connection for the per-request calls: RESP2 on one asyncio protocol.

The limit calls (``proxy.state.batch``) and the cache's get and put run once or
twice per request, and
redis-py's client costs 40 to 65 µs of CPU per command on its own (pool checkout,
timeouts, retries, health checks, event hooks; measured with a trivial script),
where writing the command and reading its reply on a plain protocol costs ~13 µs.
So those calls go through :class:`RedisLink`; everything else keeps redis-py.
It does not retry: a failed call raises StateUnavailable at once (for the cache, a miss
or a skipped store).

One connection, opened on first use and again after it breaks: commands are
written as they come and replies matched in order. A reply later than
``timeout`` closes the connection (every call waiting on it fails), so a slow
Redis cannot stall requests; failures raise :class:`StateUnavailable`. The URL
is read by redis-py's ``parse_url``: ``redis://[user:password@]host[:port][/db]``,
``rediss://`` (TLS; ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile`` in the query), ``unix:///path?db=N``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.connection import parse_url

from proxy.state import StateUnavailable


class ReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


def pack(*args: bytes | str | int | float) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int] | None:
    """The reply starting at ``pos`` and the position after it; None if incomplete.
    An error reply is returned as a :class:`ReplyError` (not raised)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buf[pos], bytes(buf[pos + 1 : end])
    if kind == 0x2B:  # + simple string
        return line, end + 2
    if kind == 0x2D:  # - error
        return ReplyError(line.decode(errors="replace")), end + 2
    if kind == 0x3A:  # : integer
        return int(line), end + 2
    if kind == 0x24:  # $ bulk string
        n = int(line)
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            return None
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 0x2A:  # * array
        n = int(line)
        pos = end + 2
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item = parse(buf, pos)
            if item is None:
                return None
            items.append(item[0])
            pos = item[1]
        return items, pos
    raise ReplyError(f"not a RESP reply: {bytes(buf[pos : pos + 16])!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.buf = bytearray()
        self.lost: StateUnavailable | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.lost is not None or self.transport is None:
            raise self.lost or StateUnavailable("redis: not connected")
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self.transport.write(command)
        return future

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        try:
            while self.waiters:
                reply = parse(buf, pos)
                if reply is None:
                    break
                value, pos = reply
                future = self.waiters.popleft()
                if not future.done():
                    if isinstance(value, ReplyError):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
        except (ReplyError, ValueError) as exc:
            self.fail(StateUnavailable(f"redis: unreadable reply: {exc}"))
            return
        del buf[:pos]

    def fail(self, error: StateUnavailable) -> None:
        """Fail every waiting call and close the connection."""
        if self.lost is None:
            self.lost = error
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(StateUnavailable(f"redis: connection lost ({exc or 'closed by the server'})"))


class RedisLink:
    """One pipelined connection to the Redis at ``url``; see the module docstring."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._options = parse_url(url)
        self._tls = urlsplit(url).scheme == "rediss"
        self._proto: _Protocol | None = None
        self._lock = asyncio.Lock()

    async def call(self, *args: bytes | str | int | float) -> Any:
        """Send one command, return its reply; raises ReplyError for an error reply,
        StateUnavailable when Redis cannot answer in time."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._connect()
        return await self._wait(proto, proto.send(pack(*args)))

    async def _wait(self, proto: _Protocol, future: asyncio.Future[Any]) -> Any:
        timer = asyncio.get_running_loop().call_later(
            self.timeout, proto.fail, StateUnavailable(f"redis: no reply in {self.timeout:g} s")
        )
        try:
            return await future
        finally:
            timer.cancel()

    async def _connect(self) -> _Protocol:
        async with self._lock:
            if self._proto is not None and self._proto.lost is None:
                return self._proto
            loop = asyncio.get_running_loop()
            o = self._options
            try:
                async with asyncio.timeout(self.timeout):
                    if "path" in o:
                        _, proto = await loop.create_unix_connection(_Protocol, o["path"])
                    else:
                        _, proto = await loop.create_connection(
                            _Protocol,
                            o.get("host", "localhost"),
                            int(o.get("port", 6379)),
                            ssl=self._ssl_context() if self._tls else None,
                        )
            except (OSError, TimeoutError) as exc:
                raise StateUnavailable(
                    f"redis: cannot connect: {type(exc).__name__}: {exc}"
                ) from exc
            try:
                if o.get("password"):
                    user = [o["username"]] if o.get("username") else []
                    await self._wait(proto, proto.send(pack("AUTH", *user, o["password"])))
                if int(o.get("db") or 0):
                    await self._wait(proto, proto.send(pack("SELECT", int(o["db"]))))
            except ReplyError as exc:
                proto.fail(StateUnavailable(f"redis: {exc}"))
                raise StateUnavailable(f"redis: {exc}") from exc
            self._proto = proto
            return proto

    def _ssl_context(self) -> ssl.SSLContext:
        o = self._options
        context = ssl.create_default_context(cafile=o.get("ssl_ca_certs"))
        if str(o.get("ssl_cert_reqs", "required")).lower() in ("none", "optional"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if o.get("ssl_certfile"):
            context.load_cert_chain(o["ssl_certfile"], o.get("ssl_keyfile"))
        return context

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


class Script:
    """A Lua script run by its SHA-1 (``EVALSHA``), sent whole (``EVAL``, which also
    caches it) when Redis does not know it (after a restart or ``SCRIPT FLUSH``)."""

    def __init__(self, link: RedisLink, text: str) -> None:
        self.link = link
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, *args: bytes | str | int | float) -> Any:
        try:
            try:
                return await self.link.call("EVALSHA", self.sha, 0, *args)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                return await self.link.call("EVAL", self.text, 0, *args)
        except ReplyError as exc:
            raise StateUnavailable(f"redis: {exc}") from exc
