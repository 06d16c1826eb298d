"""Checks on a streaming relay over real sockets, shared by every way of serving the gateway.

Each takes the full ``/v1/chat/completions`` URL of a gateway (direct, mounted under a
prefix, under another ASGI server) and the simulator behind it.
"""

from __future__ import annotations

from typing import Protocol

import httpx


class SimLike(Protocol):
    def stats(self) -> dict: ...
    def wait_aborted(self, n: int = 1, timeout: float = 5.0) -> dict: ...


def check_streams_incrementally(
    url: str, sim: SimLike, body: dict, headers: dict | None = None, *, http2: bool = False
) -> bytes:
    """The first chunk arrives while the upstream is still generating; the stream then ends
    with ``[DONE]``. Returns the whole body."""
    body = dict(body, stream=True, max_tokens=20)
    headers = {"x-sim-token-delay": "0.1", **(headers or {})}
    with httpx.Client(timeout=30, http1=not http2, http2=http2) as client:
        with client.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            if http2:
                assert r.http_version == "HTTP/2"
            chunks = r.iter_raw()
            first = next(chunks)
            assert first.startswith(b"data: ")
            # The upstream has ~2 s of tokens left: it is still streaming now.
            assert sim.stats()["open_streams"] == 1
            rest = b"".join(chunks)
    assert rest.endswith(b"data: [DONE]\n\n")
    assert sim.stats()["open_streams"] == 0
    return first + rest


def check_disconnect_aborts(
    url: str, sim: SimLike, body: dict, headers: dict | None = None
) -> None:
    """Closing the client mid-stream makes the upstream abort the generation."""
    body = dict(body, stream=True, max_tokens=200)
    headers = {"x-sim-token-delay": "0.05", **(headers or {})}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200
            it = r.iter_raw()
            next(it)
            next(it)
    stats = sim.wait_aborted(1, timeout=5)
    assert stats["aborted"] == 1
    assert stats["open_streams"] == 0
    assert stats["generation_tokens"] < 200
