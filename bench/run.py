"""Side-by-side benchmark: direct to the simulator, through nginx, through the gateway.

``python -m bench.run`` (see README, "Performance"). Starts the simulated vLLM,
the gateway (1 worker and 2 workers) and nginx (1 worker) on loopback, drives
each scenario through every path in turn (the order rotates per repetition),
repeats, and writes the medians to ``bench/RESULTS.md`` between the
``perf:begin`` / ``perf:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"

WRK_LUA = """\
wrk.method = "POST"
wrk.body = '{"model":"tiny-llama","prompt":"Say something long.","max_tokens":4096}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-sim-tokens"] = "128"
"""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    kind: str  # "wrk" or "stream"
    concurrency: int
    token_delay: float = 0.0
    tokens: int = 128
    once: bool = False


SCENARIOS = [
    Scenario("a1", "(a) non-streaming, 128 tokens, concurrency 1", "wrk", 1),
    Scenario("a32", "(a) non-streaming, 128 tokens, concurrency 32", "wrk", 32),
    Scenario("b", "(b) streaming, 128 tokens, no delay, concurrency 32", "stream", 32),
    Scenario(
        "c", "(c) streaming, 128 tokens, 10 ms between tokens, concurrency 64", "stream", 64, 0.01
    ),
    Scenario(
        "d",
        "(d) 500 concurrent slow streams, 1 token every 100 ms (40 tokens each, held ~4 s)",
        "stream",
        500,
        0.1,
        40,
        True,
    ),
]


def parse_duration_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
    return float(m.group(1)) * scale


def run_wrk(url: str, concurrency: int, duration: float, lua: str) -> dict:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration:g}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            lua,
            url + "/v1/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    assert m, out
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    requests = int(m.group(1))
    wall = parse_duration_ms(m.group(2) + m.group(3)) / 1000
    return {
        "requests": requests,
        "rps": requests / wall,
        # wrk prints no distribution when no request completed (a proxy that timed out)
        "p50_ms": parse_duration_ms(lat["50"]) if "50" in lat else None,
        "p99_ms": parse_duration_ms(lat["99"]) if "99" in lat else None,
        "errors": errors,
    }


def run_streams(url: str, s: Scenario, duration: float) -> dict:
    args = [
        sys.executable,
        "-m",
        "bench.streams",
        url,
        "--concurrency",
        str(s.concurrency),
        "--duration",
        str(duration),
        "--tokens",
        str(s.tokens),
        "--token-delay",
        str(s.token_delay),
    ]
    if s.once:
        args.append("--once")
    elif s.token_delay:
        # Steady arrivals: worker i starts i/N of one stream's length late.
        args += ["--stagger", str(s.tokens * s.token_delay)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=procs.ROOT)
    r = json.loads(out.stdout)
    r["requests"] = r["streams"]
    r["rps"] = r["streams_per_s"]
    return r


def measure(
    url: str, proxy: procs.Server | None, sim: procs.Server, s: Scenario, duration: float, lua: str
) -> dict:
    pids = proxy.pids() if proxy else []
    sim_pids = sim.pids()
    idle = procs.rss_bytes(pids)
    cpu0, sim0, t0 = procs.cpu_seconds(pids), procs.cpu_seconds(sim_pids), time.monotonic()
    with procs.RssPeak(pids) as peak:
        r = (
            run_wrk(url, s.concurrency, duration, lua)
            if s.kind == "wrk"
            else run_streams(url, s, duration)
        )
    wall = time.monotonic() - t0
    cpu = procs.cpu_seconds(pids) - cpu0
    r["cpu_ms_per_req"] = cpu * 1000 / max(1, r["requests"]) if proxy else None
    r["cpu_util"] = cpu / wall if proxy else None
    r["sim_cpu_util"] = (procs.cpu_seconds(sim_pids) - sim0) / wall
    r["rss_idle"] = idle
    r["rss_peak"] = peak.peak
    return r


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx = (
        subprocess.run([exe, "-v"], capture_output=True, text=True).stderr.strip()
        if Path(exe).exists()
        else "no nginx"
    )
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {nginx}, {wrk.split(' [')[0]}"
    )


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def render(results: dict, paths: list[str], args: argparse.Namespace, meta: dict) -> str:
    lines = [
        BEGIN,
        "## Gateway vs nginx vs direct",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Run: {meta['date']}, {meta['elapsed']:.0f} s; load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}  ",
        f"Medians of {args.repeat} repetitions; each repetition runs every path once, "
        f"in rotating order, {args.duration:g} s per run.",
        "",
        "Paths: **direct** = client → simulator; **nginx** = Debian nginx, `worker_processes 1`, "
        "`proxy_buffering off`, HTTP/1.1 keep-alive upstream, `access_log off`; "
        "**gateway** = `python -m proxy` 1 worker; **gateway-w2** = `--workers 2` "
        "(CPU and RSS summed over the master and both workers). The gateway ran with "
        "`VLLM_WRAPPER_ACCESS_LOG=false` to match nginx. Upstream for all: one "
        "`python -m proxy.sim --tokens 128` process (its CPU is not counted in the proxy's; "
        "the *sim CPU* column shows how busy it was: near 100 % means it, not the proxy, "
        "set the pace). Nothing is pinned: clients, sim and proxy share the cores.",
        "",
        "CPU ms/req = utime+stime of all the proxy's processes (from /proc, before and after "
        "the run) / requests. Added TTFT = path's TTFT − direct TTFT in the same repetition. "
        "Gap = time between consecutive reads holding SSE events (client side). In (c) the "
        "workers' first requests are spread evenly over one stream's length (1.28 s), so "
        "streams arrive steadily rather than all 64 in one burst; (b) and (d) start all at once. "
        "In (d) the RSS per open stream is (median peak − idle before the first repetition) / 500. "
        "In (b) the upstream sends tokens back to back, so the gap column measures how the "
        "proxy batches them under CPU pressure, not token spacing.",
        "",
    ]
    for s in SCENARIOS:
        rows = results[s.key]
        lines += [f"### {s.title}", ""]
        if s.kind == "wrk":
            lines += [
                "| path | req/s | p50 ms | p99 ms | CPU ms/req | × nginx | sim CPU | "
                "RSS idle MB | RSS peak MB | errors |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        else:
            lines += [
                "| path | streams/s | TTFT p50 ms | TTFT p99 ms | added TTFT p50 / p99 ms | "
                "gap p50 ms | gap vs direct | events/read | CPU ms/stream | × nginx | "
                "sim CPU | RSS idle MB | RSS peak MB | KB/open stream | errors |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
        for p in paths:
            m = rows[p]
            ratio = f"{m['cpu_ratio']:.1f}×" if m.get("cpu_ratio") is not None else "–"
            common_tail = [
                fmt(m["sim_cpu_util"] * 100, ".0f") + " %",
                fmt(m["rss_idle"] / 2**20, ".1f") if p != "direct" else "–",
                fmt(m["rss_peak"] / 2**20, ".1f") if p != "direct" else "–",
            ]
            if s.kind == "wrk":
                cells = [
                    p,
                    fmt(m["rps"], ".0f"),
                    fmt(m["p50_ms"]),
                    fmt(m["p99_ms"]),
                    fmt(m["cpu_ms_per_req"], ".3f"),
                    ratio,
                    *common_tail,
                    fmt(m["errors"], ".0f"),
                ]
            else:
                added = (
                    "–"
                    if p == "direct"
                    else f"{fmt(m['added_ttft_p50'])} / {fmt(m['added_ttft_p99'])}"
                )
                gap = "–" if p == "direct" else f"{fmt((m['gap_ratio'] - 1) * 100, '+.1f')} %"
                per_stream = (
                    "–"
                    if p == "direct" or not s.once
                    else fmt((m["rss_peak"] - m["rss_idle"]) / s.concurrency / 1024, ".1f")
                )
                cells = [
                    p,
                    fmt(m["rps"], ".1f"),
                    fmt(m["ttft_p50_ms"]),
                    fmt(m["ttft_p99_ms"]),
                    added,
                    fmt(m["gap_p50_ms"]),
                    gap,
                    fmt(m["events_per_read"]),
                    fmt(m["cpu_ms_per_req"], ".3f"),
                    ratio,
                    *common_tail,
                    per_stream,
                    fmt(m["errors"], ".0f"),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Targets (gateway, 1 worker, against nginx in the same run)", ""]
    lines += targets(results)
    lines += ["", END]
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    out = ["| target | measured | met |", "|---|---|---|"]

    def row(name: str, value: str, ok: bool) -> None:
        out.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")

    for key in ("a1", "a32"):
        r = results[key]["gateway"]["cpu_ratio"]
        row(f"CPU per non-streaming request ≤ 10× nginx ({key})", f"{r:.1f}×", r <= 10)
    for key in ("b", "c"):
        r = results[key]["gateway"]["cpu_ratio"]
        row(f"CPU per 128-token stream ≤ 10× nginx ({key})", f"{r:.1f}×", r <= 10)
    g = results["c"]["gateway"]
    row("(c) added TTFT p50 ≤ 1 ms", f"{g['added_ttft_p50']:.2f} ms", g["added_ttft_p50"] <= 1)
    row("(c) added TTFT p99 ≤ 5 ms", f"{g['added_ttft_p99']:.2f} ms", g["added_ttft_p99"] <= 5)
    dev = (g["gap_ratio"] - 1) * 100
    row("(c) median gap between chunks within 5 % of direct", f"{dev:+.1f} %", abs(dev) <= 5)
    idle = results["a1"]["gateway"]["rss_idle"] / 2**20
    row("RSS at idle ≤ 80 MB", f"{idle:.1f} MB", idle <= 80)
    d = results["d"]["gateway"]
    kb = (d["rss_peak"] - d["rss_idle"]) / 500 / 1024
    row("≤ 64 KB per open stream (d)", f"{kb:.1f} KB", kb <= 64)
    errs = sum(results[s.key][p]["errors"] for s in SCENARIOS for p in ("gateway", "gateway-w2"))
    row("zero errors (gateway, all scenarios and repetitions)", f"{errs:.0f}", errs == 0)
    return out


def write_results(section: str, begin: str = BEGIN, end: str = END) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
    p.add_argument("--only", default="", help="comma-separated scenario keys (a1,a32,b,c,d)")
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = p.parse_args()
    procs.require_tools()
    only = set(filter(None, args.only.split(",")))
    scenarios = [s for s in SCENARIOS if not only or s.key in only]
    started = time.monotonic()
    meta = {
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": f"{os.getloadavg()[0]:.2f}",
    }
    sim = procs.sim(128).start("/health")
    servers: dict[str, procs.Server | None] = {"direct": None}
    try:
        servers["nginx"] = procs.nginx(sim.port).start("/health")
        servers["gateway"] = procs.gateway(sim.url, 1).start("/health")
        servers["gateway-w2"] = procs.gateway(sim.url, 2).start("/health", workers=2)
        paths = list(servers)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(WRK_LUA)
        # Warm-up (not recorded): imports, pools and caches in every server.
        for server in servers.values():
            url = server.url if server else sim.url
            run_wrk(url, 8, 1, f.name)
            run_streams(url, Scenario("warm", "", "stream", 64, 0.005, 32), 1)
        raw: dict[str, dict[str, list[dict]]] = {}
        for s in scenarios:
            raw[s.key] = {p: [] for p in paths}
            for rep in range(args.repeat):
                order = paths[rep % len(paths) :] + paths[: rep % len(paths)]
                for path in order:
                    server = servers[path]
                    url = server.url if server else sim.url
                    r = measure(url, server, sim, s, args.duration, f.name)
                    raw[s.key][path].append(r)
                    print(
                        f"{s.key} rep{rep} {path}: "
                        + json.dumps(
                            {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                        ),
                        flush=True,
                    )
    finally:
        for server in servers.values():
            if server:
                server.stop()
        sim.stop()
    results = summarize(raw, paths)
    meta["elapsed"] = time.monotonic() - started
    meta["load_after"] = f"{os.getloadavg()[0]:.2f}"
    Path(tempfile.gettempdir(), "bench-raw.json").write_text(json.dumps(raw))
    if len(scenarios) < len(SCENARIOS) or args.no_write:
        print(json.dumps(results, indent=1))
        return
    write_results(render(results, paths, args, meta))
    print(f"wrote {RESULTS}")


def summarize(raw: dict, paths: list[str]) -> dict:
    results: dict[str, dict[str, dict]] = {}
    for key, by_path in raw.items():
        results[key] = {}
        direct = by_path["direct"]
        for p in paths:
            runs = by_path[p]
            m = {k: med([r[k] for r in runs]) for k in runs[0] if not isinstance(runs[0][k], dict)}
            if "ttft_p50_ms" in runs[0]:
                m["added_ttft_p50"] = med(
                    [r["ttft_p50_ms"] - d["ttft_p50_ms"] for r, d in zip(runs, direct, strict=True)]
                )
                m["added_ttft_p99"] = med(
                    [r["ttft_p99_ms"] - d["ttft_p99_ms"] for r, d in zip(runs, direct, strict=True)]
                )
                m["gap_ratio"] = med(
                    [
                        r["gap_p50_ms"] / d["gap_p50_ms"] if d["gap_p50_ms"] else None
                        for r, d in zip(runs, direct, strict=True)
                    ]
                )
            m["errors"] = sum(r["errors"] for r in runs)  # all repetitions, not a median
            # RSS rarely goes back to the OS: the first repetition's idle is the baseline.
            m["rss_idle"] = min(r["rss_idle"] for r in runs)
            results[key][p] = m
        ng = results[key]["nginx"]["cpu_ms_per_req"]
        for p in paths:
            c = results[key][p]["cpu_ms_per_req"]
            results[key][p]["cpu_ratio"] = c / ng if c is not None and ng else None
    return results


if __name__ == "__main__":
    main()
