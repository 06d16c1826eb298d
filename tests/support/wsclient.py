"""A small ``/chat/ws`` client for tests and the benchmark, on the ``websockets`` library."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from websockets.sync.client import ClientConnection, connect


def ws_url(http_url: str) -> str:
    return "ws" + http_url.removeprefix("http") + "/chat/ws"


@contextmanager
def chat_socket(
    http_url: str, key: str | None = None, *, ready: bool = True, **kw: Any
) -> Iterator[ClientConnection]:
    """An open socket to ``{http_url}/chat/ws`` (auth header when ``key``), past ``ready``."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    with connect(ws_url(http_url), additional_headers=headers, open_timeout=10, **kw) as ws:
        if ready:
            assert next_message(ws) == {"type": "ready"}
        yield ws


def next_message(ws: ClientConnection, timeout: float = 10.0, *, pings: bool = False) -> dict:
    """The next JSON message (keep-alive ``ping`` messages skipped unless ``pings``)."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
        if pings or message.get("type") != "ping":
            return message


def send(ws: ClientConnection, **message: Any) -> None:
    ws.send(json.dumps(message))


def collect(ws: ClientConnection, ids: set, timeout: float = 30.0) -> dict[Any, list[dict]]:
    """Messages per id until each id in ``ids`` has its ``done`` or ``error``."""
    out: dict[Any, list[dict]] = {i: [] for i in ids}
    open_ids = set(ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        message = next_message(ws, deadline - time.monotonic())
        out.setdefault(message.get("id"), []).append(message)
        if message["type"] in ("done", "error"):
            open_ids.discard(message.get("id"))
    return out


def text_of(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages if m["type"] == "delta")


class StalledClient:
    """A WebSocket client that completes the handshake, sends, and then never reads.

    Its receive buffer is made small, so the server's sends block soon: what a phone
    on a dead network or a stuck browser tab looks like to the server.
    """

    def __init__(self, http_url: str, path: str = "/chat/ws") -> None:
        host, port = http_url.removeprefix("http://").split(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (path.encode(), host.encode(), port.encode(), key)
        )
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, **message: Any) -> None:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = bytes([0x81, 0x80 | size])
        elif size < 65536:
            head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", size)
        else:
            head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def close(self) -> None:
        self.sock.close()
