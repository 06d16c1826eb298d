"""Soak: hold N concurrent /v1 streams through the gateway for a while, with faults mixed in.

    python bench/soak.py --duration 120 --streams 200

Starts the simulated vLLM and the gateway as real processes on loopback, then
runs ``--streams`` workers that each open one streamed chat completion after
another until ``--duration`` seconds have passed. Each request draws a scenario:

- ``ok``: read the stream to ``data: [DONE]``;
- ``client_disconnect``: hang up after a few chunks (the gateway must abort upstream);
- ``upstream_drop``: the simulator cuts the connection after a few chunks;
- ``upstream_stall``: the simulator goes silent for longer than ``VLLM_TIMEOUT``;
- ``upstream_503``: every attempt answers 503 (the gateway retries, then gives 503).

Alongside, ``--attackers`` hostile clients on raw sockets loop over attacks the
gateway must refuse without help from a fronting proxy (see README, "Limits"):

- ``oversized_head``: header lines that never end (431 while they arrive);
- ``slow_head``: a head sent a byte at a time (408 after ``VLLM_WRAPPER_HEADER_TIMEOUT``);
- ``trailer_flood``: a chunked body followed by trailers that never end (closed);
- ``idle``: a connection that sends nothing (closed after the header timeout).

An outcome that is not the one its scenario should give counts as *unexpected*.
At the end it reports requests by outcome, unexpected errors by kind, the
gateway's RSS and open fds (after warm-up and at the end), the upstream
streams still open, and the gateway's upstream connections, as JSON, and
rewrites the ``soak`` section of ``bench/RESULTS.md`` (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procfs import connections_to, open_fds, rss_bytes  # noqa: E402
from tests.support.servers import gateway_server, sim_server  # noqa: E402

MODEL = "tiny-llama"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
# scenario -> weight
SCENARIOS = {
    "ok": 70,
    "client_disconnect": 15,
    "upstream_drop": 5,
    "upstream_stall": 5,
    "upstream_503": 5,
}
GATEWAY_ENV = {
    "VLLM_MODEL": MODEL,
    "VLLM_TIMEOUT": "2",
    "VLLM_MAX_RETRIES": "2",
    "VLLM_WRAPPER_RETRY_BACKOFF": "0.05",
    "VLLM_WRAPPER_RETRY_BACKOFF_MAX": "0.2",
    "VLLM_WRAPPER_ACCESS_LOG": "false",
    "VLLM_WRAPPER_LOG_LEVEL": "warning",
    "VLLM_WRAPPER_HEADER_TIMEOUT": "2",
}
ATTACKS = ("oversized_head", "slow_head", "trailer_flood", "idle")
FLOOD = (b"x-flood: " + b"f" * 1000 + b"\r\n") * 16  # 16 KiB of header lines per write


async def _drain(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the gateway answers, until it closes (empty if it only closes)."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except (TimeoutError, ConnectionError):
        pass
    return data


async def one_attack(host: str, port: int, kind: str) -> str:
    """Run one attack; 'expected' when the gateway refused it as it should."""
    reader, writer = await asyncio.open_connection(host, port)
    answer_task = asyncio.create_task(_drain(reader, 20))
    try:
        if kind == "idle":
            answer = await answer_task
            return "expected" if answer == b"" else f"got:{answer[:12]!r}"
        if kind == "slow_head":
            writer.write(b"GET /v1/models HTTP/1.1\r\n")
            for _ in range(40):  # a byte every 0.25 s, for up to 10 s
                if answer_task.done():
                    break
                writer.write(b"x")
                await asyncio.sleep(0.25)
            answer = await answer_task
            return "expected" if answer.startswith(b"HTTP/1.1 408") else f"got:{answer[:12]!r}"
        if kind == "oversized_head":
            writer.write(b"GET /v1/models HTTP/1.1\r\nhost: soak\r\n")
        else:  # trailer_flood
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nhost: soak\r\ntransfer-encoding: chunked\r\n"
                b"content-type: application/json\r\n\r\n2\r\n{}\r\n0\r\n"
            )
        for _ in range(128):  # up to 2 MiB, far over the 64 KiB limit
            if answer_task.done():
                break
            writer.write(FLOOD)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (TimeoutError, ConnectionError):
                break
        answer = await answer_task
        if kind == "oversized_head":
            return "expected" if answer.startswith(b"HTTP/1.1 431") else f"got:{answer[:12]!r}"
        return "expected" if b"x-flood" not in answer else "trailers_relayed"
    except ConnectionError:
        return "expected" if kind in ("oversized_head", "trailer_flood") else "reset"
    finally:
        answer_task.cancel()
        writer.close()


async def one_request(client: httpx.AsyncClient, url: str, rng: random.Random) -> tuple[str, str]:
    """Run one request; returns (scenario, outcome) where outcome 'expected' means as planned."""
    scenario = rng.choices(list(SCENARIOS), weights=list(SCENARIOS.values()))[0]
    tokens = rng.randint(10, 60)
    headers = {"x-sim-token-delay": "0.2", "x-sim-tokens": str(tokens)}
    cut_at = rng.randint(1, 5)
    if scenario == "upstream_drop":
        headers["x-sim-drop-after"] = str(cut_at)
    elif scenario == "upstream_stall":
        headers["x-sim-stall-after"] = str(cut_at)
        headers["x-sim-stall-seconds"] = "5"
    elif scenario == "upstream_503":
        headers["x-sim-fail-status"] = "503"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
        "max_tokens": tokens,
        "stream": True,
    }
    received = b""
    status = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            status = r.status_code
            chunks = 0
            async for chunk in r.aiter_raw():
                received += chunk
                chunks += 1
                if scenario == "client_disconnect" and chunks >= cut_at:
                    return scenario, "expected"
    except httpx.HTTPError as exc:
        err = type(exc).__name__
        if scenario in ("upstream_drop", "upstream_stall") and status == 200:
            cut = err in ("RemoteProtocolError", "ReadError")
            return scenario, "expected" if cut else f"cut:{err}"
        return scenario, f"error:{err}"
    if scenario == "upstream_503":
        return scenario, "expected" if status == 503 else f"status:{status}"
    if status != 200:
        return scenario, f"status:{status}"
    if not received.endswith(b"data: [DONE]\n\n"):
        return scenario, "incomplete"
    return scenario, "expected" if scenario in ("ok", "client_disconnect") else "not_cut"


async def run_load(
    url: str, streams: int, duration: float, seed: int, attackers: int = 0, port: int = 0
) -> dict:
    outcomes: Counter[str] = Counter()
    attacks: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker(i: int) -> None:
            rng = random.Random(seed * 100_000 + i)
            await asyncio.sleep(rng.random() * 2)  # stagger the start
            while time.monotonic() < deadline:
                scenario, outcome = await one_request(client, url, rng)
                outcomes[scenario] += 1
                if outcome != "expected":
                    unexpected[f"{scenario}:{outcome}"] += 1

        async def attacker(i: int) -> None:
            n = i
            while time.monotonic() < deadline:
                kind = ATTACKS[n % len(ATTACKS)]
                n += 1
                outcome = await one_attack("127.0.0.1", port, kind)
                attacks[kind] += 1
                if outcome != "expected":
                    unexpected[f"attack_{kind}:{outcome}"] += 1

        await asyncio.gather(
            *(worker(i) for i in range(streams)), *(attacker(i) for i in range(attackers))
        )
    return {"by_scenario": dict(outcomes), "attacks": dict(attacks), "unexpected": dict(unexpected)}


def sample(pid: int, sim_port: int) -> dict:
    return {
        "rss_mib": round(rss_bytes(pid) / 2**20, 1),
        "fds": open_fds(pid),
        "upstream_connections": connections_to(pid, sim_port),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before the baseline")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--attackers", type=int, default=4, help="hostile raw-socket clients alongside"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()

    with sim_server("--model", MODEL) as sim:
        with gateway_server(sim.url + "/v1", env=GATEWAY_ENV) as gw:
            assert gw.proc is not None
            pid = gw.proc.pid
            url = gw.url + "/v1/chat/completions"
            start = sample(pid, sim.port)
            samples: list[dict] = []

            async def run() -> dict:
                async def watch() -> None:
                    t0 = time.monotonic()
                    while True:
                        await asyncio.sleep(5)
                        samples.append({"t": round(time.monotonic() - t0), **sample(pid, sim.port)})

                watcher = asyncio.create_task(watch())
                try:
                    return await run_load(
                        url, args.streams, args.duration, args.seed, args.attackers, gw.port
                    )
                finally:
                    watcher.cancel()

            t0 = time.monotonic()
            load = asyncio.run(run())
            elapsed = time.monotonic() - t0
            # Past the pool's keep-alive expiry (4 s), then one request so the pool drops
            # its idle connections: what is left open now is what leaked.
            time.sleep(5)
            httpx.get(gw.url + "/v1/models", timeout=10).raise_for_status()
            sim_stats = httpx.get(sim.url + "/_sim/stats", timeout=10).json()
            end = sample(pid, sim.port)
            gateway_errors = [
                line
                for line in gw.log_text().splitlines()
                if "Traceback" in line or " ERROR " in line or "Exception" in line
            ]
    after_warmup = next((s for s in samples if s["t"] >= args.warmup), start)
    report = {
        "command": "python bench/soak.py " + shlex.join(sys.argv[1:]),
        "streams": args.streams,
        "warmup": args.warmup,
        "duration_s": round(elapsed, 1),
        "requests": sum(load["by_scenario"].values()),
        "by_scenario": load["by_scenario"],
        "attacks": load["attacks"],
        "unexpected": load["unexpected"],
        "gateway_start": start,
        "gateway_after_warmup": after_warmup,
        "gateway_end": end,
        "upstream_open_streams_end": sim_stats["open_streams"],
        "upstream": {k: sim_stats[k] for k in ("requests", "completed", "aborted", "dropped")},
        "gateway_error_log_lines": len(gateway_errors),
        "samples": samples,
    }
    print(json.dumps(report, indent=2), flush=True)
    if not args.no_write:
        write_results(report)


def write_results(report: dict) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    s, w, e = report["gateway_start"], report["gateway_after_warmup"], report["gateway_end"]
    unexpected = ", ".join(f"{k}: {v}" for k, v in report["unexpected"].items()) or "none"
    up = "upstream_connections"
    rss_series = ", ".join(f"{x['rss_mib']:g}" for x in report["samples"])
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(report["by_scenario"].items()))
    rows += "".join(
        f"\n| attack: {k} | {v} |" for k, v in sorted(report.get("attacks", {}).items())
    )
    section = f"""{BEGIN}
## Soak

`{report["command"]}` (simulator and gateway as real processes on loopback, one
gateway worker, on the 2-core shared development machine; streams of 10–60 tokens
at 0.2 s per token; `VLLM_TIMEOUT=2`, `VLLM_MAX_RETRIES=2`; raw-socket attackers
alongside: oversized and slow heads, trailer floods, idle sockets, with
`VLLM_WRAPPER_HEADER_TIMEOUT=2`).

- {report["streams"]} concurrent streams for {report["duration_s"]} s (the load runs for
  `--duration`, then each worker finishes its last request):
  **{report["requests"]} requests**, unexpected outcomes: **{unexpected}**.
- Upstream streams still open at the end: **{report["upstream_open_streams_end"]}**
  (simulator: {report["upstream"]["requests"]} requests received,
  {report["upstream"]["completed"]} completed, {report["upstream"]["aborted"]} aborted
  because the gateway closed them (client hang-ups, stalls past `VLLM_TIMEOUT`),
  {report["upstream"]["dropped"]} cut on purpose).
- Gateway error or traceback log lines: {report["gateway_error_log_lines"]}.

| scenario | requests |
|---|---|
{rows}

| gateway | start | after warm-up | end |
|---|---|---|---|
| RSS (MiB) | {s["rss_mib"]} | {w["rss_mib"]} | {e["rss_mib"]} |
| open fds | {s["fds"]} | {w["fds"]} | {e["fds"]} |
| upstream connections | {s[up]} | {w[up]} | {e[up]} |

"After warm-up" is the first sample at or after {report["warmup"]} s; "end" is 5 s
after the last request (past the pool's 4 s keep-alive expiry) and one more request.
Gateway RSS (MiB) every 5 s under load: {rss_series}.
{END}"""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
