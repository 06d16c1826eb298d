"""Cost of keys and limits: the gateway's CPU per request and added latency with auth +
limits on (memory, SQLite, Redis) against limits off, in the same run; Redis round trips
per request.

    python -m bench.limits [--repeat 3] [--duration 4]

Paths (each a fresh ``python -m proxy``, 1 worker, access log off, in front of one
simulator): **off** no keys; **auth** one key without limits; **memory** / **sqlite** /
**redis** the same key with rpm, tpm, max_parallel and daily/monthly quotas set high
enough never to refuse, on that backend (Redis: a local ``redis-server``). Load: wrk,
non-streaming ``/v1/completions`` of 128 tokens. Round trips = Redis ``commandstats``
calls during the run / requests; redis-server's own CPU per request is listed too.
The section between the markers in bench/RESULTS.md is rewritten.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench import procs
from bench.run import WRK_LUA, run_wrk, write_results
from tests.support.redis import RedisServer, redis_binary

BEGIN, END = "<!-- limits:begin -->", "<!-- limits:end -->"
KEY = "bench-key"
LIMITS = (
    "rpm = 1000000000\ntpm = 1000000000000\nmax_parallel = 100000\n"
    "daily_tokens = 1000000000000\nmonthly_tokens = 1000000000000\n"
)
PATHS = ("off", "auth", "memory", "sqlite", "redis")


def config(tmp: Path, path: str, redis_url: str) -> str | None:
    if path == "off":
        return None
    limits = "" if path == "auth" else LIMITS
    state = {
        "auth": "",
        "memory": '[state]\nbackend = "memory"\n',
        "sqlite": f'[state]\npath = "{tmp / "state.db"}"\n',
        "redis": f'[state]\nredis_url = "{redis_url}"\n',
    }[path]
    file = tmp / f"{path}.toml"
    file.write_text(f'[[keys]]\nname = "bench"\nkey = "{KEY}"\n{limits}\n{state}')
    return str(file)


def machine() -> str:
    import os
    import platform
    import subprocess

    redis = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True)
    version = redis.stdout.split()[2] if redis.stdout else "?"
    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, redis-server {version}"
    )


def redis_calls(url: str) -> int:
    import redis

    # Commands a script runs are counted too: count the client's own calls only.
    stats = redis.Redis.from_url(url).info("commandstats")
    own = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script", "cmdstat_ping")
    return sum(v["calls"] for k, v in stats.items() if k in own)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--concurrency", default="1,32")
    args = p.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    lua = tmp / "wrk.lua"
    lua.write_text(WRK_LUA + f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
    results: dict[tuple[str, int], list[dict]] = {}
    with RedisServer() as redis_server:
        assert redis_server.proc is not None
        redis_pid = [redis_server.proc.pid]
        sim = procs.sim(128).start("/health")
        try:
            for rep in range(args.repeat):
                order = PATHS[rep % len(PATHS) :] + PATHS[: rep % len(PATHS)]
                for path in order:
                    gw = procs.gateway(sim.url, 1)
                    cfg = config(tmp, path, redis_server.url)
                    if cfg:
                        gw.args += ["--config", cfg]
                    gw.start("/health")
                    try:
                        r = httpx.post(
                            gw.url + "/v1/completions",
                            json={"model": "tiny-llama", "prompt": "x", "max_tokens": 4},
                            headers={"Authorization": f"Bearer {KEY}"},
                        )
                        assert r.status_code == 200, r.text
                        run_wrk(gw.url, 8, 1, str(lua))  # warm-up
                        for c in conc:
                            calls0 = redis_calls(redis_server.url)
                            cpu0 = procs.cpu_seconds(gw.pids())
                            rcpu0 = procs.cpu_seconds(redis_pid)
                            out = run_wrk(gw.url, c, args.duration, str(lua))
                            time.sleep(0.3)  # the last settlements
                            out["cpu_ms"] = (
                                (procs.cpu_seconds(gw.pids()) - cpu0)
                                * 1000
                                / max(out["requests"], 1)
                            )
                            out["rtt"] = (redis_calls(redis_server.url) - calls0) / max(
                                out["requests"], 1
                            )
                            out["redis_cpu_ms"] = (
                                (procs.cpu_seconds(redis_pid) - rcpu0)
                                * 1000
                                / max(out["requests"], 1)
                            )
                            results.setdefault((path, c), []).append(out)
                    finally:
                        gw.stop()
        finally:
            sim.stop()
    lines = [
        BEGIN,
        "## Keys and limits: cost per request",
        "",
        f"Command: `python -m bench.limits --repeat {args.repeat} --duration {args.duration:g}`  ",
        f"Machine: {machine()}  ",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"{time.time() - started:.0f} s. Medians of {args.repeat} repetitions, paths in "
        "rotating order; non-streaming `/v1/completions`, 128 tokens, wrk.",
        "",
        "**off** no keys; **auth** one key, no limits; **memory** / **sqlite** / **redis**: "
        "the key with rpm, tpm, max_parallel, daily and monthly quotas (never refusing) on "
        "that backend. Added = p50 − p50 of off, same concurrency. Redis round trips = "
        "EVALSHA/EVAL/SCRIPT calls Redis served per request (the limit calls of many "
        "requests share one batch); redis-server CPU = the Redis process's own CPU per "
        "request, not in the gateway's figure.",
        "",
    ]
    for c in conc:
        base = statistics.median(r["p50_ms"] for r in results[("off", c)])
        base_cpu = statistics.median(r["cpu_ms"] for r in results[("off", c)])
        lines += [
            f"### concurrency {c}",
            "",
            "| path | req/s | p50 ms | p99 ms | added p50 ms | CPU ms/req | CPU vs off | "
            "Redis round trips/req | redis-server CPU ms/req | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for path in PATHS:
            rs = results[(path, c)]

            def med(k: str, rs: list[dict] = rs) -> float:
                return statistics.median(r[k] for r in rs)

            rtt = f"{med('rtt'):.2f}" if path == "redis" else "–"
            rcpu = f"{med('redis_cpu_ms'):.3f}" if path == "redis" else "–"
            errors = sum(r["errors"] for r in rs)
            lines.append(
                f"| {path} | {med('rps'):.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} | "
                f"{med('p50_ms') - base:+.2f} | {med('cpu_ms'):.3f} | "
                f"{med('cpu_ms') / base_cpu:.2f}× | {rtt} | {rcpu} | {errors} |"
            )
        lines.append("")
    lines.append(END)
    section = "\n".join(lines)
    write_results(section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
