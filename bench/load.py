"""The load of ``bench.full``: a wrk script for non-streaming requests, and a client for streams.

Every request, on every path, has the same shape: ``POST /v1/chat/completions``
with a body unique in the run (a counter in the prompt, ``temperature`` 0: a cache
miss whenever the cache is on), ``Authorization: Bearer`` one of :data:`KEYS` in
turn (the gateway's key ring holds all 100; the other paths ignore the header) and
``x-sim-tokens`` / ``x-sim-delay-ms`` for the fast upstream.

``python -m bench.load URL --mode closed|steady|burst ...`` runs streams and prints
one JSON object (the per-stream timing comes from :func:`bench.streams.one_stream`):

* ``closed``: ``--concurrency`` connections, each starting its next stream as soon
  as the last ended, for ``--duration`` seconds;
* ``steady``: ``--rate`` arrivals per second, evenly spaced, for ``--duration``
  seconds, each on an idle keep-alive connection (opened in advance);
* ``burst``: ``--concurrency`` connections opened in advance, then all of them
  send a stream at the same instant; ``--bursts`` times, ``--gap`` seconds apart
  (the next burst starts when every stream of the last has ended).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import deque
from urllib.parse import urlsplit

from bench.streams import Stats, one_stream

KEYS = [f"bench-key-{i:03d}" for i in range(100)]
PATH = "/v1/chat/completions"
MODEL = "tiny-llama"

_WRK = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local keys = {{{keys}}}
local n = 0
function request()
  n = n + 1
  local body = '{{"model":"{model}","messages":[{{"role":"user","content":"bench {prefix} '
    .. n .. '"}}],"max_tokens":{tokens},"temperature":0}}'
  return wrk.format("POST", "{path}", {{
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. keys[n % #keys + 1],
    ["x-sim-tokens"] = "{tokens}",
  }}, body)
end
"""

# A fixed schedule shared by the thread's connections: each request takes the next
# slot, 1/rate after the last one; a connection waits for its slot (wrk's delay() is
# in whole ms, so a request may leave up to 1 ms early; the average rate is exact).
# A path that falls behind catches up as fast as its connections allow.
_WRK_RATE = """\
local interval = {interval}
local slot = nil
function delay()
  local t = now()
  if slot == nil then slot = t end
  local mine = slot
  slot = slot + interval
  local ms = (mine - t) * 1000
  if ms < 0 then return 0 end
  return ms
end
"""


def wrk_script(prefix: str, tokens: int = 128, rate: float | None = None) -> str:
    """The Lua script: unique bodies, rotating keys; at ``rate`` requests/s when given."""
    script = _WRK.format(
        keys=",".join(f'"{k}"' for k in KEYS), model=MODEL, prefix=prefix, tokens=tokens, path=PATH
    )
    if rate:
        script += _WRK_RATE.format(interval=repr(1.0 / rate))
    return script


class Requests:
    """Stream requests as bytes: a unique body each, the keys in turn."""

    def __init__(self, host: str, prefix: str, tokens: int, delay_ms: float) -> None:
        self.head = (
            f"POST {PATH} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"x-sim-tokens: {tokens}\r\nx-sim-delay-ms: {delay_ms:g}\r\n"
        )
        self.prefix = prefix
        self.tokens = tokens
        self.n = 0

    def next(self) -> bytes:
        self.n += 1
        body = (
            f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"bench {self.prefix} '
            f'{self.n}"}}],"max_tokens":{self.tokens},"temperature":0,"stream":true}}'
        ).encode()
        key = KEYS[self.n % len(KEYS)]
        head = f"{self.head}authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n"
        return head.encode() + body


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _open(host: str, port: int, n: int) -> list[Conn]:
    conns: list[Conn] = []
    for start in range(0, n, 100):  # in batches: no SYN flood on the listen backlog
        batch = min(100, n - start)
        conns += await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(batch)))
    return conns


async def _one(conn: Conn, reqs: Requests, stats: Stats) -> bool:
    try:
        return await one_stream(conn[0], conn[1], reqs.next(), stats)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        stats.error(type(exc).__name__)
        return False


async def closed(host: str, port: int, args: argparse.Namespace, reqs: Requests) -> Stats:
    stats = Stats()
    deadline = time.perf_counter() + args.duration

    async def worker(conn: Conn) -> None:
        while time.perf_counter() < deadline:
            if not await _one(conn, reqs, stats):
                conn[1].close()
                conn = (await _open(host, port, 1))[0]
        conn[1].close()

    await asyncio.gather(*(worker(c) for c in await _open(host, port, args.concurrency)))
    return stats


async def steady(host: str, port: int, args: argparse.Namespace, reqs: Requests) -> Stats:
    stats = Stats()
    length = args.tokens * args.delay_ms / 1000
    idle: deque[Conn] = deque(await _open(host, port, math.ceil(args.rate * length * 1.5) + 8))
    tasks: set[asyncio.Task[None]] = set()

    async def run(conn: Conn) -> None:
        if await _one(conn, reqs, stats):
            idle.append(conn)
        else:
            conn[1].close()

    n = int(args.rate * args.duration)
    start = time.perf_counter()
    for i in range(n):
        wait = start + i / args.rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        conn = idle.popleft() if idle else (await _open(host, port, 1))[0]
        task = asyncio.create_task(run(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    for conn in idle:
        conn[1].close()
    return stats


async def burst(host: str, port: int, args: argparse.Namespace, reqs: Requests) -> Stats:
    stats = Stats()
    conns = await _open(host, port, args.concurrency)
    for b in range(args.bursts):
        if b:
            await asyncio.sleep(args.gap)
        ok = await asyncio.gather(*(_one(c, reqs, stats) for c in conns))
        broken = [i for i, good in enumerate(ok) if not good]
        for i, fresh in zip(broken, await _open(host, port, len(broken)), strict=True):
            conns[i][1].close()
            conns[i] = fresh
    for c in conns:
        c[1].close()
    return stats


async def run(args: argparse.Namespace) -> dict:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reqs = Requests(parts.netloc, args.prefix, args.tokens, args.delay_ms)
    mode = {"closed": closed, "steady": steady, "burst": burst}[args.mode]
    start = time.perf_counter()
    stats = await mode(host, port, args, reqs)
    wall = time.perf_counter() - start
    rps = stats.streams / wall
    return {"requests": stats.streams, "wall_s": wall, "rps": rps, **stats.figures()}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("--mode", choices=("closed", "steady", "burst"), required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=100.0, help="steady: arrivals per second")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--delay-ms", type=float, default=0.0, help="ms between tokens")
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--gap", type=float, default=0.5, help="burst: seconds between bursts")
    p.add_argument("--prefix", default="x", help="makes the bodies unique to this run")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        print(json.dumps(asyncio.run(run(args))))
    else:
        print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
