"""proxy.h1client against scripted servers on real loopback sockets (no mocks)."""

from __future__ import annotations

import asyncio
import errno
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy import h1client as h1
from proxy.upstream import UpstreamResponse, _os_reason

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A scripted HTTP server: ``handler`` runs once per accepted connection."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # a client closed a connection (EOF seen)

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request head and its content-length body; None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed.set()
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def pool(**overrides: float) -> h1.Pool:
    settings = {"max_connections": 10, "keepalive": 4.0, "connect_timeout": 2.0}
    settings.update(overrides)
    settings.setdefault("pool_timeout", 2.0)
    return h1.Pool(**settings)  # type: ignore[arg-type]


def origin(server: Server) -> h1.Origin:
    host = f"[{server.host}]" if ":" in server.host else server.host
    return h1.Origin(f"http://{host}:{server.port}")


async def body_of(response: h1.Response) -> bytes:
    return await UpstreamResponse(response, 5).read()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def answer_each(reply: bytes, server: Server, reader, writer) -> None:
    while await server.request(reader) is not None:
        writer.write(reply)
        await writer.drain()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def test_request_head_and_keep_alive_reuse() -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            await answer_each(ok(b"hello", b"X-Thing: A\r\n"), server, reader, writer)

        async with Server(handler) as server:
            p = pool()
            for _ in range(3):
                r = await p.request(
                    b"POST",
                    origin(server),
                    b"/v1/x?q=1",
                    [(b"a", b"b")],
                    b"{}",
                    5,
                    b"authorization: Bearer k\r\n",
                )
                assert r.status == 200
                assert (b"x-thing", b"A") in r.headers  # names lower-case, values as sent
                assert await body_of(r) == b"hello"
                r.close()
            assert server.connections == 1
            first = server.requests[0]
            assert first.startswith(b"POST /v1/x?q=1 HTTP/1.1\r\nhost: 127.0.0.1:")
            assert b"\r\na: b\r\n" in first and b"\r\ncontent-length: 2\r\n" in first
            assert b"\r\nauthorization: Bearer k\r\n" in first and first.endswith(b"\r\n\r\n{}")
            assert p.in_use == 0
            await p.aclose()

    run(main())


def test_chunked_bodies_stream_as_they_arrive_and_close_delimited_ones_end_at_eof() -> None:
    async def main() -> None:
        step = asyncio.Event()

        async def handler(reader, writer, server):
            request = await server.request(reader)
            if b"/chunked" in request:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                await step.wait()
                writer.write(b"6\r\nsecond\r\n0\r\nx-trailer: t\r\n\r\n")
                await writer.drain()
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
                await writer.drain()

        async with Server(handler) as server:
            p = pool()
            r = await p.request(b"GET", origin(server), b"/chunked", [], b"", 5)
            assert await r.readany() == b"first"  # before the rest was even sent
            step.set()
            assert await r.readany() == b"second"
            assert await r.readany() == b""
            assert [n for n, _ in r.headers] == [b"transfer-encoding"]  # no trailer in the head
            r = await p.request(b"GET", origin(server), b"/eof", [], b"", 5)
            assert await body_of(r) == b"until the end"
            await p.aclose()

    run(main())


def test_head_204_and_interim_answers_have_no_body_and_keep_the_connection() -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            while (request := await server.request(reader)) is not None:
                if request.startswith(b"HEAD"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n")
                elif b"/204" in request:
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))
                await writer.drain()

        async with Server(handler) as server:
            p = pool()
            r = await p.request(b"HEAD", origin(server), b"/", [], b"", 5)
            assert (r.status, await body_of(r)) == (200, b"")
            r = await p.request(b"GET", origin(server), b"/204", [], b"", 5)
            assert (r.status, await body_of(r)) == (204, b"")
            r = await p.request(b"GET", origin(server), b"/100", [], b"", 5)
            assert (r.status, await body_of(r)) == (200, b"final")
            assert server.connections == 1
            assert not server.requests[0].lower().count(b"content-length")  # HEAD: no body
            await p.aclose()

    run(main())


def test_bytes_on_an_idle_connection_close_it_and_never_reach_the_next_request() -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            n = 0
            while await server.request(reader) is not None:
                n += 1
                writer.write(ok(b"answer %d" % server.connections))
                await writer.drain()
                if n == 1:
                    await asyncio.sleep(0.2)
                    writer.write(ok(b"poison"))  # a late second response
                    await writer.drain()

        async with Server(handler) as server:
            p = pool()
            r = await p.request(b"GET", origin(server), b"/", [], b"", 5)
            assert await body_of(r) == b"answer 1"
            await asyncio.sleep(0.5)
            r = await p.request(b"GET", origin(server), b"/", [], b"", 5)
            assert await body_of(r) == b"answer 2"
            assert server.connections == 2
            await p.aclose()

    run(main())


def test_an_unread_body_closes_its_connection_and_frees_the_slot() -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            await server.request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
            await writer.drain()
            await server.request(reader)  # EOF: the client closed it

        async with Server(handler) as server:
            p = pool(max_connections=1)
            r = await p.request(b"POST", origin(server), b"/", [], b"{}", 5)
            assert await r.readany() == b"a"
            assert p.in_use == 1
            r.close()
            assert p.in_use == 0
            await asyncio.wait_for(server.closed.wait(), 5)
            await p.aclose()

    run(main())


def test_pool_full_when_no_connection_comes_free_and_a_released_one_is_handed_on() -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            await answer_each(ok(b"x"), server, reader, writer)

        async with Server(handler) as server:
            p = pool(max_connections=1, pool_timeout=0.2)
            await body_of(await p.request(b"GET", origin(server), b"/", [], b"", 5))
            # The body arrived whole, so the connection is back: take it for good.
            conn = await p._acquire(origin(server))
            with pytest.raises(h1.PoolFull):
                await p.request(b"GET", origin(server), b"/", [], b"", 5)
            waiting = asyncio.ensure_future(p.request(b"GET", origin(server), b"/", [], b"", 5))
            await asyncio.sleep(0.05)
            p._release(conn, True)
            assert await body_of(await waiting) == b"x"
            await p.aclose()

    run(main())


def test_keep_alive_expiry_opens_a_fresh_connection() -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            await answer_each(ok(b"x"), server, reader, writer)

        async with Server(handler) as server:
            p = pool(keepalive=0.1)
            for _ in range(2):
                await body_of(await p.request(b"GET", origin(server), b"/", [], b"", 5))
                await asyncio.sleep(0.3)
            assert server.connections == 2
            await p.aclose()

    run(main())


@pytest.mark.parametrize(("method", "resent"), [(b"GET", True), (b"POST", False)])
def test_a_kept_alive_connection_the_server_dropped_is_resent_only_if_idempotent(
    method: bytes, resent: bool
) -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            if await server.request(reader) is None:
                return
            writer.write(ok(b"x"))
            await writer.drain()
            if server.connections == 1:
                await server.request(reader)  # the second request: dropped unanswered
                return
            await answer_each(ok(b"x"), server, reader, writer)

        async with Server(handler) as server:
            p = pool()
            await body_of(await p.request(method, origin(server), b"/", [], b"", 5))
            if resent:
                r = await p.request(method, origin(server), b"/", [], b"", 5)
                assert await body_of(r) == b"x"
                assert server.connections == 2
            else:
                with pytest.raises((h1.Disconnected, h1.BrokenConnection)):
                    await p.request(method, origin(server), b"/", [], b"", 5)
                assert server.connections == 1
            await p.aclose()

    run(main())


def test_connect_refused_read_timeout_bad_and_cut_responses() -> None:
    async def main() -> None:
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        p = pool()
        with pytest.raises(h1.ConnectError) as refused:
            await p.request(b"GET", h1.Origin(f"http://127.0.0.1:{port}"), b"/", [], b"", 5)
        assert refused.value.os_error.errno == errno.ECONNREFUSED
        assert _os_reason(refused.value) == "connection refused"

        async def handler(reader, writer, server):
            request = await server.request(reader)
            if b"/silent" in request:
                await asyncio.sleep(5)
            elif b"/bad" in request:
                writer.write(b"HTTP/1.1 200 OK\r\nx-bad: a\x01b\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
            await writer.drain()

        async with Server(handler) as server:
            with pytest.raises(TimeoutError):
                await p.request(b"GET", origin(server), b"/silent", [], b"", 0.2)
            with pytest.raises(h1.BadResponse):
                await p.request(b"GET", origin(server), b"/bad", [], b"", 5)
            r = await p.request(b"GET", origin(server), b"/cut", [], b"", 5)
            assert await r.readany() == b"short"
            with pytest.raises(h1.BrokenConnection):
                await r.readany()
            assert p.in_use == 0
        await p.aclose()

    run(main())


def test_dns_names_and_ipv6_literals() -> None:
    async def main() -> None:
        async def handler(reader, writer, server):
            await answer_each(ok(b"x"), server, reader, writer)

        async with Server(handler) as server:
            p = pool()
            named = h1.Origin(f"http://localhost:{server.port}")
            assert named.host_header == b"localhost:%d" % server.port
            r = await p.request(b"GET", named, b"/", [], b"", 5)
            assert await body_of(r) == b"x"
            await p.aclose()
        if not socket.has_ipv6:
            return
        try:
            server = Server(handler, host="::1")
            await server.__aenter__()
        except OSError:
            return  # no IPv6 loopback here
        try:
            p = pool()
            o = origin(server)
            assert o.host == "::1" and o.host_header == b"[::1]:%d" % server.port
            assert await body_of(await p.request(b"GET", o, b"/", [], b"", 5)) == b"x"
            await p.aclose()
        finally:
            await server.__aexit__()

    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_upstreams_verify_the_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=test ca",
        "-days",
        "2",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "s.key",
        "-out",
        "s.csr",
        "-subj",
        "/CN=localhost",
    )
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "s.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "s.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")

    async def main() -> None:
        async def handler(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(ok(head.split(b" ")[1]))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            p = pool()  # the default context: the system's CAs, here the test CA only
            with pytest.raises(h1.ConnectError) as untrusted:  # the CA is not trusted yet
                await p.request(b"GET", h1.Origin(f"https://localhost:{port}"), b"/", [], b"", 5)
            assert _os_reason(untrusted.value).startswith("TLS: ")
            assert "certificate" in _os_reason(untrusted.value), _os_reason(untrusted.value)
            monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
            p = pool()
            r = await p.request(b"GET", h1.Origin(f"https://localhost:{port}"), b"/tls", [], b"", 5)
            assert await body_of(r) == b"/tls"
            await p.aclose()
        finally:
            server.close()

    run(main())
