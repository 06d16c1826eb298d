"""What routing costs: the gateway with one upstream against the same gateway with two.

``python -m bench.upstreams`` (see README, "Many upstreams"). Starts two simulated
vLLM processes and three gateways (1 worker each, access log off):

* **one**: ``VLLM_BASE_URL`` = the first simulator (today's single-upstream path);
* **two**: a config file with both simulators serving one model (least-busy; the
  request body is not read);
* **two-models**: both serve ``tiny-llama`` and the second also ``other``, so the
  gateway reads each request's ``model`` to route it (one JSON parse per request).

Each scenario runs through every gateway in turn (rotating order), repeated, and the
medians go to ``bench/RESULTS.md`` between the ``upstreams:begin`` / ``upstreams:end``
markers, with each upstream's share of the requests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import procs
from bench.run import RESULTS, SCENARIOS, WRK_LUA, machine, measure, med, run_wrk, write_results

BEGIN, END = "<!-- upstreams:begin -->", "<!-- upstreams:end -->"
KEYS = ("a1", "a32", "b")


def config_file(urls: list[str]) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        for url in urls:
            f.write(f'[[upstreams]]\nurl = "{url}/v1"\n')
    return f.name


def export(rev: str) -> Path:
    """The source tree of git revision ``rev``, in a temporary directory."""
    dest = Path(tempfile.mkdtemp(prefix="bench-src-"))
    archive = subprocess.run(
        ["git", "archive", rev], cwd=procs.ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def served(sim: procs.Server) -> int:
    return httpx.get(sim.url + "/_sim/stats", timeout=10).json()["requests"]


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.upstreams", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    p.add_argument("--only", default="", help="comma-separated scenario keys (a1,a32,b)")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the single-upstream gateway of git revision REV (e.g. main) as 'one@REV'",
    )
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk: apt-get install -y wrk")
    only = set(filter(None, args.only.split(","))) or set(KEYS)
    scenarios = [s for s in SCENARIOS if s.key in KEYS and s.key in only]
    meta = {
        "command": " ".join(["python -m bench.upstreams", *sys.argv[1:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": f"{os.getloadavg()[0]:.2f}",
    }
    started = time.monotonic()
    sim1 = procs.sim(128).start("/health")
    sim2 = procs.sim(128).start("/health")
    sim3 = procs.sim(128, "tiny-llama,other").start("/health")
    sims = [sim1, sim2, sim3]
    gateways: dict[str, procs.Server] = {}
    try:
        gateways["one"] = procs.gateway(sim1.url, 1).start("/health")
        if args.baseline:
            src = export(args.baseline)
            gateways[f"one@{args.baseline}"] = procs.gateway(sim1.url, 1, src=src).start("/health")
        two = {"VLLM_WRAPPER_CONFIG": config_file([sim1.url, sim2.url])}
        gateways["two"] = procs.gateway(sim1.url, 1, two).start("/health")
        models = {"VLLM_WRAPPER_CONFIG": config_file([sim1.url, sim3.url])}
        gateways["two-models"] = procs.gateway(sim1.url, 1, models).start("/health")
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(WRK_LUA)
        for gw in gateways.values():  # warm-up, not recorded
            run_wrk(gw.url, 8, 1, f.name)
        paths = list(gateways)
        raw: dict[str, dict[str, list[dict]]] = {}
        for s in scenarios:
            raw[s.key] = {name: [] for name in paths}
            for rep in range(args.repeat):
                k = rep % len(paths)
                for name in paths[k:] + paths[:k]:
                    before = [served(x) for x in sims]
                    r = measure(gateways[name].url, gateways[name], sim1, s, args.duration, f.name)
                    r["served"] = [served(x) - b for x, b in zip(sims, before, strict=True)]
                    raw[s.key][name].append(r)
                    print(f"{s.key} rep{rep} {name}: {json.dumps(r)}", flush=True)
    finally:
        for gw in gateways.values():
            gw.stop()
        for sim in sims:
            sim.stop()
    meta["elapsed"] = f"{time.monotonic() - started:.0f}"
    meta["load_after"] = f"{os.getloadavg()[0]:.2f}"
    section = render(raw, scenarios, args, meta)
    print(section)
    if not args.no_write:
        write_results(section, BEGIN, END)
        print(f"wrote {RESULTS}")


def render(raw: dict, scenarios: list, args: argparse.Namespace, meta: dict) -> str:
    out = [
        BEGIN,
        "## Many upstreams: routing cost and spread",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Run: {meta['date']}, {meta['elapsed']} s; load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}  ",
        f"Medians of {args.repeat} repetitions, {args.duration:g} s per run, gateways in "
        "rotating order. **one** = `VLLM_BASE_URL` with one simulator; **two** = a config "
        "file with two simulators serving one model (least-busy, body not read); "
        "**two-models** = two simulators, the second also serving `other`, so every request's "
        "`model` is read to route it. CPU ms/req = the gateway process's utime+stime / "
        "requests. Spread = each upstream's share of the requests (all repetitions). "
        "**one@REV** (with `--baseline REV`) = the single-upstream gateway of that git "
        "revision, for the cost of this code on the single-upstream path.",
        "",
    ]
    for s in scenarios:
        out += [
            f"### {s.title}",
            "",
            "| gateway | req/s | CPU ms/req | vs one | spread (first / second upstream) | errors |",
            "|---|---|---|---|---|---|",
        ]
        base = med([r["cpu_ms_per_req"] for r in raw[s.key]["one"]])
        for name, runs in raw[s.key].items():
            cpu = med([r["cpu_ms_per_req"] for r in runs])
            rps = med([r["rps"] for r in runs])
            served = [sum(r["served"][i] for r in runs) for i in range(3)]
            total = sum(served) or 1
            if name.startswith("one"):
                spread = "100 % / –"
            else:
                second = served[1] if name == "two" else served[2]
                spread = f"{served[0] / total:.1%} / {second / total:.1%}"
            vs = f"{(cpu / base - 1) * 100:+.1f} %" if base and cpu and name != "one" else "–"
            errors = sum(r["errors"] for r in runs)
            out.append(f"| {name} | {rps:.0f} | {cpu:.3f} | {vs} | {spread} | {errors} |")
        out.append("")
    out.append(END)
    return "\n".join(out)


if __name__ == "__main__":
    main()
