"""What the metrics cost: gateway CPU per request and per stream, metrics on against off.

``python -m bench.metrics`` (about 3 minutes) starts the simulated vLLM and two gateways
side by side, ``VLLM_WRAPPER_METRICS=true`` and ``=false`` (1 worker; then both with
``--workers 2``, where metrics use prometheus-client's multiprocess files), drives the
same load through each in turn (the order alternates per repetition), and reads the
gateways' CPU time from ``/proc``. It then times ``/metrics`` scrapes with many series,
in one process and in multiprocess mode. The figures replace the section between the
``metrics:begin`` / ``metrics:end`` markers of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.run import write_results

BEGIN, END = "<!-- metrics:begin -->", "<!-- metrics:end -->"
BODY = json.dumps(
    {"model": "tiny-llama", "prompt": "Say something long.", "max_tokens": 4096}
).encode()


async def _one_connection(host: str, port: int, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\nx-sim-tokens: 128\r\n\r\n"
    ).encode()
    try:
        while time.monotonic() < deadline:
            writer.write(head + BODY)
            raw = await reader.readuntil(b"\r\n\r\n")
            status = int(raw.split(b" ", 2)[1])
            length = 0
            for line in raw.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            counts[0 if status == 200 else 1] += 1
    finally:
        writer.close()


async def _unary_load(url: str, concurrency: int, duration: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    counts = [0, 0]
    deadline = time.monotonic() + duration
    await asyncio.gather(
        *(_one_connection(host, int(port), deadline, counts) for _ in range(concurrency))
    )
    return {"requests": counts[0], "errors": counts[1]}


def unary(url: str, concurrency: int, duration: float) -> dict:
    return asyncio.run(_unary_load(url, concurrency, duration))


def streams(url: str, concurrency: int, duration: float) -> dict:
    args = [sys.executable, "-m", "bench.streams", url, "--concurrency", str(concurrency)]
    args += ["--duration", str(duration), "--tokens", "128"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=procs.ROOT)
    r = json.loads(out.stdout)
    errors = r.get("errors", 0)
    return {
        "requests": r["streams"],
        "errors": sum(errors.values()) if isinstance(errors, dict) else errors,
    }


def gateway(upstream: str, workers: int, metrics: bool) -> procs.Server:
    port = procs.free_port()
    env = {
        "VLLM_BASE_URL": upstream + "/v1",
        "VLLM_WRAPPER_API_KEY": "",
        "VLLM_WRAPPER_ACCESS_LOG": "false",
        "VLLM_WRAPPER_LOG_LEVEL": "warning",
        "VLLM_WRAPPER_METRICS": "true" if metrics else "false",
    }
    args = [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--env-file", "", "--workers", str(workers)]
    name = f"gateway-w{workers}-{'on' if metrics else 'off'}"
    return procs.Server(name, args, port, env)


def measure(server: procs.Server, load, concurrency: int, duration: float) -> dict:
    pids = server.pids()
    cpu0 = procs.cpu_seconds(pids)
    r = load(server.url, concurrency, duration)
    cpu = procs.cpu_seconds(pids) - cpu0
    r["cpu_ms"] = cpu * 1000 / max(1, r["requests"])
    return r


SCRAPE_CODE = """
import json, os, sys, time
from prometheus_client import disable_created_metrics
disable_created_metrics()  # as python -m proxy does
from proxy.accesslog import RequestInfo
from proxy.metrics import Metrics
models = [f"model-{i}" for i in range(int(sys.argv[1]))]
keys = [f"team-{i}" for i in range(int(sys.argv[2]))]
m = Metrics(set(models), multiproc_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
for route in ("/v1/chat/completions", "/v1/completions", "/chat"):
    for model in models:
        for key in keys:
            for status in (200, 400, 429, 503):
                info = RequestInfo(b"x")
                info.model, info.key_name = model, key
                info.set_usage({"prompt_tokens": 10, "completion_tokens": 20})
                t = info.started
                info.status, info.headers_at, info.first_byte_at = status, t + 0.001, t + 0.01
                info.complete = True
                ctype = b"text/event-stream" if status == 200 else b"application/json"
                info.response_headers = [(b"content-type", ctype)]
                m.observe(info, route, "POST", t + 1)
times = []
for _ in range(15):
    t0 = time.perf_counter()
    body, _ = m.scrape()
    times.append(time.perf_counter() - t0)
series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
times.sort()
print(json.dumps({"series": series, "bytes": len(body), "median_ms": times[7] * 1000}))
"""


STUB_CODE = """
import asyncio, json, os, sys, time
from proxy.accesslog import AccessLogMiddleware, request_info
from proxy.metrics import Metrics, MetricsMiddleware
BODY = b'{"model":"tiny-llama","prompt":"Say something long.","max_tokens":4096}'
CHUNK = b"data: " + b"x" * 200 + b"\\n\\n"

def stub(chunks, ctype):
    async def app(scope, receive, send):
        info = request_info(scope)
        info.body, info.upstream_ms = BODY, 0.1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype)]})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return app

async def send(message):
    pass

async def receive():
    return {"type": "http.request", "body": BODY}

async def run(app, n):
    t0 = time.process_time()
    for _ in range(n):
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "query_string": b""}
        await app(scope, receive, send)
    return (time.process_time() - t0) / n * 1e6

async def main():
    out = {}
    metrics = Metrics({"tiny-llama"}, multiproc_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
    for name, chunks, ctype, n in (("unary", 1, b"application/json", 20000),
                                   ("stream", 130, b"text/event-stream", 1000)):
        app = stub(chunks, ctype)
        on = AccessLogMiddleware(MetricsMiddleware(app, metrics=metrics), enabled=False)
        off = AccessLogMiddleware(app, enabled=False)
        diffs = []
        for _ in range(5):
            a = await run(off, n)
            b = await run(on, n)
            diffs.append((a, b))
        diffs.sort(key=lambda d: d[1] - d[0])
        out[name] = diffs[2]
    print(json.dumps(out))

asyncio.run(main())
"""


def run_code(code: str, *args: str, multiproc: bool) -> dict:
    """Run ``code`` in a fresh interpreter (in multiprocess mode: with its own metrics
    directory) and return the JSON it prints."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory(prefix="bench-prom-") as d:
        if multiproc:
            env["PROMETHEUS_MULTIPROC_DIR"] = d
        out = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=procs.ROOT,
            env=env,
        )
    return json.loads(out.stdout)


def stub_cost(multiproc: bool) -> dict:
    """CPU µs per request of the access log alone and with metrics, on a stub app."""
    return run_code(STUB_CODE, multiproc=multiproc)


def scrape_cost(models: int, keys: int, multiproc: bool) -> dict:
    return run_code(SCRAPE_CODE, str(models), str(keys), multiproc=multiproc)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.metrics")
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    sim = procs.sim(128).start("/health")
    rows = []
    try:
        plan = ((1, ("unary-c1", "unary", "stream")), (2, ("unary",)))
        for workers, loads in plan:
            on = gateway(sim.url, workers, True).start("/health", workers)
            off = gateway(sim.url, workers, False).start("/health", workers)
            try:
                for kind in loads:
                    load = streams if kind == "stream" else unary
                    concurrency = 1 if kind.endswith("-c1") else args.concurrency
                    got: dict[str, list[dict]] = {"on": [], "off": []}
                    for rep in range(args.repeat):
                        order = [("on", on), ("off", off)]
                        if rep % 2:
                            order.reverse()
                        for name, server in order:
                            got[name].append(measure(server, load, concurrency, args.duration))
                    rows.append((workers, kind, got))
                    print(workers, kind, json.dumps(got), flush=True)
            finally:
                on.stop()
                off.stop()
    finally:
        sim.stop()
    scrapes = [
        (models, keys, mp, scrape_cost(models, keys, mp))
        for models, keys in ((5, 5), (20, 20))
        for mp in (False, True)
    ]
    for s in scrapes:
        print(json.dumps(s), flush=True)
    stubs = [(mp, stub_cost(mp)) for mp in (False, True)]
    print(json.dumps(stubs), flush=True)
    section = render(rows, scrapes, stubs, args, load0, os.getloadavg()[0])
    if args.no_write:
        print(section)
        return
    write_results(section, BEGIN, END)


LOADS = {
    "unary-c1": "non-streaming, concurrency 1",
    "unary": "non-streaming",
    "stream": "128-token streams",
}


def render(
    rows: list, scrapes: list, stubs: list, args: argparse.Namespace, load0: float, load1: float
) -> str:
    out = [
        BEGIN,
        "## Metrics on against off",
        "",
        f"`python -m bench.metrics` (written by it; {args.repeat} repetitions of "
        f"{args.duration:g} s per path, concurrency {args.concurrency} unless said, on and off "
        "alternating; "
        f"load average {load0:.2f} before / {load1:.2f} after). Machine: {machine()}.",
        "Gateway CPU (utime+stime of its processes from `/proc`) per request: "
        "non-streaming `/v1/completions` answers of 128 tokens, and 128-token streams "
        "(`bench.streams`, no delay). Median of the repetitions; each repetition's figure "
        "in brackets.",
        "",
        "| workers | load | metrics off: CPU ms/req | metrics on: CPU ms/req | on vs off | "
        "requests (off / on) |",
        "|---|---|---|---|---|---|",
    ]
    for workers, kind, got in rows:
        off = [r["cpu_ms"] for r in got["off"]]
        on = [r["cpu_ms"] for r in got["on"]]
        m_off, m_on = statistics.median(off), statistics.median(on)
        n_off = sum(r["requests"] for r in got["off"])
        n_on = sum(r["requests"] for r in got["on"])
        errors = sum(r["errors"] for r in got["off"] + got["on"])
        out.append(
            f"| {workers} | {LOADS[kind]} | "
            f"{m_off:.3f} ({', '.join(f'{v:.3f}' for v in off)}) | "
            f"{m_on:.3f} ({', '.join(f'{v:.3f}' for v in on)}) | "
            f"{(m_on / m_off - 1) * 100:+.1f} % | {n_off} / {n_on}"
            f"{f' ({errors} errors)' if errors else ''} |"
        )
    out += [
        "",
        "The metrics' own work in one process, without the network and the upstream: the "
        "access log (off) and the metrics middleware on a stub app that answers a "
        "`/v1/completions` request whole (1 body chunk) or as a 130-chunk stream; CPU µs per "
        "request, the median of 5 alternating runs (this is what the table above measures "
        "end to end, where the machine's load adds noise of several percent):",
        "",
        "| mode | response | access log only | with metrics | added |",
        "|---|---|---|---|---|",
    ]
    for mp, stub in stubs:
        for name, (off, on) in stub.items():
            out.append(
                f"| {'multiprocess' if mp else 'one process'} | "
                f"{'130-chunk stream' if name == 'stream' else 'whole'} | "
                f"{off:.1f} | {on:.1f} | {on - off:+.1f} µs |"
            )
    out += [
        "",
        "Cost of one scrape (`Metrics.scrape()`, the work behind `GET /metrics`, median of 15) "
        "after traffic on 3 routes × M models × K keys × 4 statuses, in one process and in "
        "multiprocess mode (one process's files):",
        "",
        "| models × keys | mode | series | bytes | ms per scrape |",
        "|---|---|---|---|---|",
    ]
    for models, keys, mp, s in scrapes:
        out.append(
            f"| {models} × {keys} | {'multiprocess' if mp else 'one process'} | {s['series']} | "
            f"{s['bytes']} | {s['median_ms']:.1f} |"
        )
    out.append(END)
    return "\n".join(out)


if __name__ == "__main__":
    main()
