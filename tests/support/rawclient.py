"""A hostile HTTP client on raw sockets: exact bytes out, everything the server says back."""

from __future__ import annotations

import select
import socket
import time


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_close(sock: socket.socket, timeout: float = 15.0, limit: int = 1 << 22) -> bytes:
    """What the server sends until it closes (or ``timeout`` passes, or ``limit`` bytes)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < limit and time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def read_message(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 message with a ``Content-Length`` body (or none): (head, body), or None
    if the peer closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head, body


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response off a keep-alive connection: (head, body)."""
    message = read_message(sock)
    assert message is not None, "the server closed the connection"
    return message


def exchange(port: int, raw: bytes, timeout: float = 15.0) -> bytes:
    """Send ``raw``, then read until the server closes the connection."""
    with connect(port, timeout) as sock:
        sock.sendall(raw)
        return read_until_close(sock, timeout)


def flood(sock: socket.socket, chunk: bytes, *, max_bytes: int, timeout: float = 15.0) -> int:
    """Send ``chunk`` repeatedly until the server answers or stops reading, ``max_bytes`` are
    out, or ``timeout`` passes. Returns the bytes sent."""
    sent = 0
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    try:
        while sent < max_bytes and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                break  # the server said something (or closed)
            if writable:
                try:
                    sent += sock.send(chunk)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    break
    finally:
        sock.setblocking(True)
    return sent


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response (0 if there is none)."""
    if not response.startswith(b"HTTP/1."):
        return 0
    return int(response.split(b" ", 2)[1])
