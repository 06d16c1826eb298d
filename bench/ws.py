"""``/chat/ws`` against ``/chat`` SSE in the same run: time to first token, CPU per answer.

``python -m bench.ws`` starts one simulator (``--tokens 128`` with a pause between
tokens) and one gateway (1 worker, access log off), then runs the two transports
in alternating order, ``--repeats`` times, ``--duration`` s each, with
``--concurrency`` clients. An SSE client holds one keep-alive connection and posts
``/chat`` with ``"stream": true`` again and again; a WebSocket client holds one
socket and sends one ``chat`` message after the other on it. Both are aiohttp.

TTFT is from sending the request to the first text (an SSE ``data:`` line, a
``delta`` message); CPU ms/answer is the gateway's utime+stime (from /proc)
over the run / answers completed. Medians over the repetitions go to
``bench/RESULTS.md`` between the ``ws:begin`` / ``ws:end`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

import aiohttp

from bench import procs
from bench.run import med, write_results

BEGIN, END = "<!-- ws:begin -->", "<!-- ws:end -->"
MODEL = "tiny-llama"  # the simulator's default
MESSAGES = [{"role": "user", "content": "Tell me something long."}]


class Tally:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.answers = 0
        self.errors = 0


async def sse_worker(session: aiohttp.ClientSession, url: str, stop: float, t: Tally) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 128, "stream": True}
    while time.monotonic() < stop:
        start = time.perf_counter()
        first = None
        try:
            async with session.post(url + "/chat", json=body) as r:
                async for line in r.content:
                    if first is None and line.startswith(b"data: "):
                        first = time.perf_counter()
                    if line.startswith(b"data: [DONE]"):
                        break
            if first is None:
                raise RuntimeError("no text")
        except Exception:
            t.errors += 1
            continue
        t.ttft.append((first - start) * 1000)
        t.answers += 1


async def ws_worker(session: aiohttp.ClientSession, url: str, stop: float, t: Tally) -> None:
    async with session.ws_connect(url.replace("http", "ws", 1) + "/chat/ws") as ws:
        assert (await ws.receive_json())["type"] == "ready"
        n = 0
        while time.monotonic() < stop:
            n += 1
            start = time.perf_counter()
            first = None
            turn = {"type": "chat", "id": n, "model": MODEL, "messages": MESSAGES}
            await ws.send_str(json.dumps({**turn, "max_tokens": 128}))
            while True:
                message = await ws.receive_json()
                kind = message["type"]
                if kind == "delta" and first is None:
                    first = time.perf_counter()
                elif kind in ("done", "error"):
                    break
            if kind == "error" or first is None:
                t.errors += 1
                continue
            t.ttft.append((first - start) * 1000)
            t.answers += 1


async def run_once(transport: str, url: str, concurrency: int, duration: float) -> Tally:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.monotonic() + duration
        worker = sse_worker if transport == "sse" else ws_worker
        await asyncio.gather(*(worker(session, url, stop, tally) for _ in range(concurrency)))
    return tally


def measure(transport: str, gateway: procs.Server, args: argparse.Namespace) -> dict:
    pids = gateway.pids()
    cpu0, t0 = procs.cpu_seconds(pids), time.monotonic()
    tally = asyncio.run(run_once(transport, gateway.url, args.concurrency, args.duration))
    cpu, wall = procs.cpu_seconds(pids) - cpu0, time.monotonic() - t0
    ttft = sorted(tally.ttft)
    return {
        "answers/s": tally.answers / wall,
        "ttft_p50": statistics.median(ttft) if ttft else None,
        "ttft_p99": ttft[int(len(ttft) * 0.99) - 1] if len(ttft) >= 100 else None,
        "cpu_ms": cpu * 1000 / tally.answers if tally.answers else None,
        "errors": tally.errors,
    }


def render(results: dict[str, list[dict]], args: argparse.Namespace, meta: dict) -> str:
    rows = []
    for transport, label in (("sse", "`POST /chat` SSE"), ("ws", "`/chat/ws` WebSocket")):
        runs = results[transport]
        value = {k: med([r[k] for r in runs]) for k in runs[0]}
        errors = sum(r["errors"] for r in runs)

        def f(v: float | None, spec: str = ".2f") -> str:
            return "–" if v is None else format(v, spec)

        rows.append(
            f"| {label} | {f(value['answers/s'], '.1f')} | {f(value['ttft_p50'])} | "
            f"{f(value['ttft_p99'])} | {f(value['cpu_ms'], '.3f')} | {errors} |"
        )
    return "\n".join(
        [
            BEGIN,
            "## /chat/ws against /chat SSE",
            "",
            "Command: `python -m bench.ws`  ",
            f"Machine: {meta['machine']}  ",
            f"Run: {meta['when']}, {meta['seconds']:.0f} s; load average before/after: "
            f"{meta['load0']} / {meta['load1']}  ",
            f"Medians of {args.repeats} repetitions, transports in alternating order, "
            f"{args.duration:g} s per run, {args.concurrency} clients.",
            "",
            f"Upstream: `python -m proxy.sim --tokens 128 --token-delay {args.token_delay:g}` "
            "(128 tokens per answer); gateway: `python -m proxy`, 1 worker, access log off. "
            "SSE clients reuse one keep-alive connection each; WebSocket clients one socket each, "
            "one turn after the other. TTFT: request sent → first text at the client. CPU "
            "ms/answer: the gateway's utime+stime / answers. Clients, simulator and gateway "
            "share the cores.",
            "",
            "| transport | answers/s | TTFT p50 ms | TTFT p99 ms | CPU ms/answer | errors |",
            "|---|---|---|---|---|---|",
            *rows,
            END,
        ]
    )


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ws", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--token-delay", type=float, default=0.005)
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = p.parse_args()

    started, load0 = time.monotonic(), load()
    sim = procs.sim(128)
    sim.args += ["--token-delay", str(args.token_delay)]
    sim.start("/health")
    try:
        gateway = procs.gateway(sim.url, 1).start("/health")
        try:
            results: dict[str, list[dict]] = {"sse": [], "ws": []}
            for rep in range(args.repeats):
                order = ("sse", "ws") if rep % 2 == 0 else ("ws", "sse")
                for transport in order:
                    r = measure(transport, gateway, args)
                    results[transport].append(r)
                    print(rep, transport, r, file=sys.stderr, flush=True)
        finally:
            gateway.stop()
    finally:
        sim.stop()
    meta = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, Linux "
        f"{platform.release()}, Python {platform.python_version()}",
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.monotonic() - started,
        "load0": load0,
        "load1": load(),
    }
    section = render(results, args, meta)
    print(section)
    if not args.no_write:
        write_results(section, BEGIN, END)


if __name__ == "__main__":
    main()
