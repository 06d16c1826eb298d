"""An asyncio load client for streamed completions: time to first token, gaps between chunks.

``python -m bench.streams URL --concurrency 32 --duration 4 --token-delay 0.01``
prints one JSON object. Each of ``concurrency`` workers holds one keep-alive
connection and sends ``POST /v1/completions`` with ``stream: true`` again and
again until ``duration`` has passed (``--once``: exactly one stream each).

It speaks HTTP/1.1 on raw asyncio streams (no HTTP library) so the client's own
cost stays small and its timings are those of the bytes: TTFT is from writing
the request to the first read that holds an SSE ``data:`` line; a "gap" is the
time between two consecutive reads that hold ``data:`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

BODY = json.dumps(
    {"model": "tiny-llama", "prompt": "Say something long.", "max_tokens": 4096, "stream": True}
).encode()


class Stats:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.events = 0
        self.reads = 0
        self.streams = 0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def figures(self) -> dict:
        """Time to first token and token gaps (ms), events per read, errors."""
        ms = 1000.0
        return {
            "ttft_p50_ms": (pct(self.ttft, 0.5) or 0) * ms,
            "ttft_p99_ms": (pct(self.ttft, 0.99) or 0) * ms,
            "gap_p50_ms": (pct(self.gaps, 0.5) or 0) * ms,
            "gap_p99_ms": (pct(self.gaps, 0.99) or 0) * ms,
            "events_per_read": self.events / max(1, self.reads),
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
        }


def request_bytes(host: str, path: str, tokens: int, delay: float) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\nx-sim-tokens: {tokens}\r\n"
        f"x-sim-token-delay: {delay}\r\n\r\n"
    )
    return head.encode() + BODY


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def one_stream(reader, writer, request: bytes, stats: Stats) -> bool:  # type: ignore[no-untyped-def]
    """One request/response on the connection. Returns False if the connection is unusable."""
    t0 = time.perf_counter()
    writer.write(request)
    status, headers = await read_head(reader)
    if status != 200:
        stats.error(f"status {status}")
        return False
    if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
        stats.error("not chunked")
        return False
    buf = b""
    last: float | None = None
    done = False
    carry = b""  # the last bytes of the payload so far: a proxy may split "data: [DONE]"
    while True:
        data = await reader.read(65536)
        if not data:
            stats.error("connection closed mid-stream")
            return False
        now = time.perf_counter()
        stats.reads += 1
        buf += data
        payload = bytearray()
        # Decode as much chunked framing as the buffer holds.
        ended = False
        while True:
            nl = buf.find(b"\r\n")
            if nl < 0:
                break
            size = int(buf[:nl].split(b";")[0], 16)
            if size == 0:
                ended = len(buf) >= nl + 4  # "0\r\n\r\n": no trailers from these servers
                break
            if len(buf) < nl + 2 + size + 2:
                break
            payload += buf[nl + 2 : nl + 2 + size]
            buf = buf[nl + 4 + size :]
        n = payload.count(b"data: ")
        if n:
            stats.events += n
            if last is None:
                stats.ttft.append(now - t0)
            else:
                stats.gaps.append(now - last)
            last = now
        if payload:
            seen = carry + payload
            if b"data: [DONE]" in seen:
                done = True
            carry = seen[-12:]
        if ended:
            break
    if not done:
        stats.error("no [DONE]")
    stats.streams += 1
    return True


async def worker(
    url: str,
    tokens: int,
    delay: float,
    deadline: float,
    once: bool,
    stats: Stats,
    start_after: float = 0.0,
):  # type: ignore[no-untyped-def]
    await asyncio.sleep(start_after)
    parts = urlsplit(url)
    request = request_bytes(parts.netloc, "/v1/completions", tokens, delay)
    writer = None
    try:
        while True:
            if writer is None:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            try:
                ok = await one_stream(reader, writer, request, stats)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                stats.error(type(exc).__name__)
                ok = False
            if not ok:
                writer.close()
                writer = None
            if once or time.perf_counter() >= deadline:
                return
    finally:
        if writer is not None:
            writer.close()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(args: argparse.Namespace) -> dict:
    stats = Stats()
    start = time.perf_counter()
    deadline = start + args.duration
    await asyncio.gather(
        *(
            worker(
                args.url,
                args.tokens,
                args.token_delay,
                deadline,
                args.once,
                stats,
                i * args.stagger / args.concurrency,
            )
            for i in range(args.concurrency)
        )
    )
    wall = time.perf_counter() - start
    return {
        "streams": stats.streams,
        "wall_s": wall,
        "streams_per_s": stats.streams / wall,
        **stats.figures(),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.streams")
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="spread the workers' first requests evenly over this many seconds (steady arrivals "
        "instead of all streams starting, and ending, in one burst)",
    )
    p.add_argument("--once", action="store_true", help="one stream per worker, then stop")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
