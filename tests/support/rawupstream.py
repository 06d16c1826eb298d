"""Misbehaving upstreams on raw sockets, for faults the simulator cannot show.

:class:`RawUpstream` listens on a free loopback port and, for every request it
receives whole, does what ``mode`` says:

- ``silent``: never answers (the gateway's read timeout fires);
- ``reset``: resets the connection (TCP RST) before any response byte;
- ``reset_after``: sends 200 ``text/event-stream`` headers and ``chunks`` SSE
  events, then resets the connection;
- ``script``: calls ``script(conn, request, n)`` with the raw request (head and body)
  and its number on this connection; it writes what it likes and returns whether to
  keep the connection for the next request.

``receipts`` counts the requests received whole: what "reached the upstream".
:func:`full_backlog_port` gives a port whose accept queue is full, so a new
connection hangs in connect (the gateway's connect timeout fires).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.support.rawclient import read_message


def _reset(conn: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


Script = Callable[[socket.socket, bytes, int], bool]


def _read_request(conn: socket.socket) -> bytes | None:
    """One whole request (head and Content-Length body), or None at end of stream."""
    message = read_message(conn)
    return None if message is None else message[0] + b"\r\n\r\n" + message[1]


class RawUpstream:
    def __init__(self, mode: str, *, chunks: int = 2, script: Script | None = None) -> None:
        self.mode = mode
        self.chunks = chunks
        self.script = script
        self.receipts = 0
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self._server.settimeout(0.1)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}/v1"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            self._conns.append(conn)
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            n = 0
            while (request := _read_request(conn)) is not None:
                with self._lock:
                    self.receipts += 1
                    self.requests.append(request)
                if self.mode == "script":
                    assert self.script is not None
                    if not self.script(conn, request, n):
                        conn.close()
                        return
                    n += 1
                    continue
                if self.mode == "silent":
                    self._stop.wait(60)
                    return
                if self.mode == "reset_after":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n"
                    )
                    for i in range(self.chunks):
                        event = b'data: {"n": %d}\n\n' % i
                        conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                _reset(conn)
                return
        except OSError:
            pass

    def __enter__(self) -> RawUpstream:
        t = threading.Thread(target=self._serve, daemon=True)
        self._threads.append(t)
        t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for c in self._conns:
            c.close()
        self._server.close()


@contextmanager
def full_backlog_port() -> Iterator[str]:
    """A base URL whose listener never accepts and whose accept queue is already full."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers: list[socket.socket] = []
    try:
        # Fill the queue; once it is full, further SYNs are dropped and connect() hangs.
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(server.getsockname())
            except BlockingIOError:
                pass
            fillers.append(c)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    finally:
        for c in fillers:
            c.close()
        server.close()
