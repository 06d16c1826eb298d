"""The gateway with every feature, against nginx and a direct path, behind a fast upstream.

``python -m bench.full [--repeat 3] [--duration 3] [--only s1,s4] [--paths off,all]
[--litellm EXE] [--no-write]``

Upstream: ``python -m bench.fastup`` (precomputed answers on raw asyncio), so the
proxies, not the upstream, set the pace. Paths, all started once and kept for the
run: **direct** (client → fastup), **nginx** (1 worker, the config of
``bench/procs.py``), the gateway (1 worker, access log off) with **off** every feature
off, then one feature alone: **auth** (100 ``[[keys]]``, the load rotates among
them), **limits** (the same keys with ``rpm``, ``tpm`` and ``max_parallel`` too high
to refuse, state on a real ``redis-server``), **metrics**, **upstreams** (two fastup
processes, ``least-busy``), **cache** (``[cache] enabled``, every request a miss:
bodies are unique); **all** every feature together, and **all-w2** the same with
``--workers 2``. With ``--litellm EXE`` also **litellm**: LiteLLM's proxy from a
virtualenv of its own (not a dependency of this project), no auth, as **off**.

Scenarios (see :data:`SCENARIOS`): non-streaming at saturation and at fixed rates
(wrk), 128-token streams back to back, streams with steady arrivals, and bursts of
64 and 500 streams arriving at once (``bench/load.py``). Each repetition runs every
scenario through every path, the paths' order rotating per repetition; medians of
the repetitions are reported, every ratio taken within a repetition.

Each run records the load average before it and the CPU the machine spent during it
that none of this bench's processes spent (``/proc/stat`` busy time minus the CPU of
the bench's whole process tree: load generator, upstreams, proxies, redis); a run with
more than ``--foreign`` of one core of such CPU is discarded and run again (at most
``--retries`` times; then the quietest attempt is kept and counted as noisy).

Also measured: fastup against the simulator (``python -m proxy.sim``), directly and
behind nginx; and ``--workers 2`` against 1 worker with the gateway pinned to one core
and the load generator and upstream to the other. The section between the
``full:begin`` / ``full:end`` markers of bench/RESULTS.md is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.load import KEYS, wrk_script
from bench.run import RESULTS, machine, run_wrk, write_results
from tests.support.redis import RedisServer

BEGIN, END = "<!-- full:begin -->", "<!-- full:end -->"
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    kind: str  # "wrk" or "stream"
    concurrency: int = 32
    rate: float | None = None  # wrk: fixed requests/s; steady streams: arrivals/s
    mode: str = ""  # streams: closed | steady | burst
    tokens: int = 128
    delay_ms: float = 0.0
    bursts: int = 0
    gap: float = 0.0
    scale: float = 1.0  # of --duration


SCENARIOS = [
    Scenario("s1", "S1 non-streaming at saturation (wrk, 32 connections)", "wrk", 32),
    Scenario("s2a", "S2 non-streaming at 500 req/s (wrk, 16 connections)", "wrk", 16, 500),
    Scenario("s2b", "S2 non-streaming at 2,000 req/s (wrk, 32 connections)", "wrk", 32, 2000),
    Scenario(
        "s3", "S3 128-token streams, tokens back to back, 32 at a time", "stream", 32,
        mode="closed",
    ),
    Scenario(
        "s4", "S4 steady arrivals: 50 streams/s, 128 tokens 10 ms apart (~64 open)", "stream",
        rate=50, mode="steady", delay_ms=10, scale=1.5,
    ),
    Scenario(
        "s5", "S5 bursts: 64 streams at once (5 bursts), 32 tokens 10 ms apart", "stream", 64,
        mode="burst", tokens=32, delay_ms=10, bursts=5, gap=0.3,
    ),
    Scenario(
        "s6", "S6 bursts: 500 streams at once (3 bursts), 16 tokens 50 ms apart", "stream", 500,
        mode="burst", tokens=16, delay_ms=50, bursts=3, gap=0.5,
    ),
]  # fmt: skip

GATEWAYS = ("off", "auth", "limits", "metrics", "upstreams", "cache", "all", "all-w2")
PATHS = ("direct", "nginx", *GATEWAYS)
FEATURES = ("auth", "limits", "metrics", "upstreams", "cache", "all", "all-w2")

KEYS_TOML = "".join(f'[[keys]]\nname = "k{i:03d}"\nkey = "{k}"\n\n' for i, k in enumerate(KEYS))
LIMITS_TOML = "[limits]\nrpm = 1000000000\ntpm = 1000000000000\nmax_parallel = 100000\n\n"
CACHE_TOML = "[cache]\nenabled = true\nttl = 60\nmax_bytes = 67108864\n\n"


def gateway_config(path: str, redis_url: str, upstreams: list[str]) -> tuple[str, bool]:
    """(the TOML file's text, metrics on) of a gateway path."""
    two = "".join(f'[[upstreams]]\nurl = "{u}/v1"\n\n' for u in upstreams)
    two += '[routing]\npolicy = "least-busy"\n\n'
    limits = KEYS_TOML + LIMITS_TOML + f'[state]\nredis_url = "{redis_url}"\n\n'
    return {
        "off": ("", False),
        "auth": (KEYS_TOML, False),
        "limits": (limits, False),
        "metrics": ("", True),
        "upstreams": (two, False),
        "cache": (CACHE_TOML, False),
        "all": (limits + two + CACHE_TOML, True),
        "all-w2": (limits + two + CACHE_TOML, True),
    }[path]


# --- what /proc says ---------------------------------------------------------------


def own_cpu() -> float:
    """CPU seconds of this process's whole tree: live processes, and (``cutime``,
    ``cstime``) those that exited and were reaped."""
    total = 0
    for pid in procs.tree(os.getpid()):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / _TICK


def busy_cpu() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; steal and idle excluded)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = f[:7]
    return (user + nice + system + irq + softirq) / _TICK


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (the load generator, once it ended)."""
    f = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[13]) + int(f[14])) / _TICK


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of ``pids`` onto ``cpus``."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


def litellm_version(exe: str) -> str:
    """The version of the ``litellm`` package next to the ``exe`` command."""
    python = Path(exe).with_name("python")
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "(version unknown)"


# --- one run -------------------------------------------------------------------------


@dataclass
class Target:
    """What a run drives: the URL, the proxy's processes (none for direct)."""

    name: str
    url: str
    proxy: procs.Server | None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-full-"))
        self.run_id = uuid.uuid4().hex[:8]
        self.counter = 0
        self.discarded = 0
        self.noisy = 0
        self.waited = 0.0
        self.wait_left = args.max_wait
        self.upstreams: list[procs.Server] = []
        self.others: list[procs.Server] = []
        self.redis: RedisServer | None = None
        self.litellm_version = litellm_version(args.litellm) if args.litellm else ""

    def prefix(self) -> str:
        self.counter += 1
        return f"{self.run_id}-{self.counter}"

    def upstream_pids(self) -> list[int]:
        return [p for s in self.upstreams for p in s.pids()]

    def redis_pids(self) -> list[int]:
        return [self.redis.proc.pid] if self.redis and self.redis.proc else []

    def load(self, t: Target, s: Scenario, wrk_cpus: str | None = None) -> dict:
        """Drive ``s`` through ``t`` once; the client's own figures."""
        if s.kind == "wrk":
            script = self.tmp / f"{self.prefix()}.lua"
            script.write_text(wrk_script(script.stem, rate=s.rate))
            seconds = max(1, round(self.args.duration))  # wrk takes whole seconds
            return run_wrk_pinned(t.url, s.concurrency, seconds, str(script), wrk_cpus)
        argv = [sys.executable, "-m", "bench.load", t.url, "--mode", s.mode]
        argv += ["--concurrency", str(s.concurrency)]
        argv += ["--duration", str(self.args.duration * s.scale)]
        argv += ["--tokens", str(s.tokens), "--delay-ms", str(s.delay_ms)]
        argv += ["--prefix", self.prefix()]
        if s.rate:
            argv += ["--rate", str(s.rate)]
        if s.bursts:
            argv += ["--bursts", str(s.bursts), "--gap", str(s.gap)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=procs.ROOT)
        return json.loads(out.stdout)

    def measure(self, t: Target, s: Scenario, wrk_cpus: str | None = None) -> dict:
        """One run, in a quiet moment if one comes, with the machine's other load checked
        during it; repeated while it was noisy."""
        attempts: list[dict] = []
        while True:
            self.wait_quiet()
            r = self._once(t, s, wrk_cpus)
            attempts.append(r)
            if r["foreign"] <= self.args.foreign:
                break
            if len(attempts) > self.args.retries or self.discarded >= self.args.max_discards:
                self.noisy += 1
                break
            self.discarded += 1
            print(f"  discarded: foreign CPU {r['foreign']:.0%} of a core", flush=True)
        best = min(attempts, key=lambda r: r["foreign"])
        best["attempts"] = len(attempts)
        return best

    def wait_quiet(self, most: float = 15.0, window: float = 0.3) -> None:
        """Until a ``window`` shows no more than ``--foreign`` of a core of other load, at
        most ``most`` seconds, and no more than ``--max-wait`` seconds in the whole run."""
        start = time.monotonic()
        deadline = start + min(most, self.wait_left)
        while True:
            busy0, own0 = busy_cpu(), own_cpu()
            time.sleep(window)
            foreign = (busy_cpu() - busy0) - (own_cpu() - own0)
            if foreign <= self.args.foreign * window or time.monotonic() >= deadline:
                break
        self.waited += time.monotonic() - start
        self.wait_left = max(0.0, self.wait_left - (time.monotonic() - start - window))

    def _once(self, t: Target, s: Scenario, wrk_cpus: str | None) -> dict:
        proxy_pids = t.proxy.pids() if t.proxy else []
        up_pids, redis_pids = self.upstream_pids(), self.redis_pids()
        load_before = os.getloadavg()[0]
        busy0, own0, kids0 = busy_cpu(), own_cpu(), children_cpu()
        proxy0, up0 = procs.cpu_seconds(proxy_pids), procs.cpu_seconds(up_pids)
        redis0 = procs.cpu_seconds(redis_pids)
        workers0 = [procs.cpu_seconds([p]) for p in proxy_pids]
        t0 = time.monotonic()
        r = self.load(t, s, wrk_cpus)
        wall = time.monotonic() - t0
        busy, own = busy_cpu() - busy0, own_cpu() - own0
        proxy = procs.cpu_seconds(proxy_pids) - proxy0
        n = max(1, r["requests"])
        r.update(
            wall=wall,
            load_before=load_before,
            foreign=max(0.0, busy - own) / wall,
            proxy_cpu_ms=proxy * 1000 / n if t.proxy else None,
            proxy_util=proxy / wall if t.proxy else None,
            worker_cpu=[
                procs.cpu_seconds([p]) - c for p, c in zip(proxy_pids, workers0, strict=True)
            ],
            upstream_cpu_ms=(procs.cpu_seconds(up_pids) - up0) * 1000 / n,
            redis_cpu_ms=(procs.cpu_seconds(redis_pids) - redis0) * 1000 / n,
            client_util=(children_cpu() - kids0) / wall,
        )
        return r


def run_wrk_pinned(url: str, c: int, duration: float, script: str, cpus: str | None) -> dict:
    """``bench.run.run_wrk``, wrk on ``cpus`` (e.g. ``"0"``) when given."""
    if cpus is None:
        return run_wrk(url, c, duration, script)
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(x) for x in cpus.split(",")})
    try:
        return run_wrk(url, c, duration, script)  # wrk inherits this process's affinity
    finally:
        os.sched_setaffinity(0, saved)


# --- statistics ----------------------------------------------------------------------


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def per_rep(raw: dict, key: str, path: str, f) -> float | None:  # type: ignore[no-untyped-def]
    """Median over repetitions of ``f(run of path, run of direct, run of nginx, run of off)``."""
    runs = raw[key]
    out = []
    for i, r in enumerate(runs.get(path, [])):
        ref = {p: runs[p][i] for p in ("direct", "nginx", "off") if p in runs and len(runs[p]) > i}
        try:
            out.append(f(r, ref))
        except (KeyError, TypeError, ZeroDivisionError):
            continue
    return med(out)


def latency_keys(s: Scenario) -> tuple[str, str]:
    return ("p50_ms", "p99_ms") if s.kind == "wrk" else ("ttft_p50_ms", "ttft_p99_ms")


def summarize(raw: dict, scenarios: list[Scenario], paths: list[str]) -> dict:
    res: dict[str, dict[str, dict]] = {}
    for s in scenarios:
        p50, p99 = latency_keys(s)
        res[s.key] = {}
        for p in paths:
            runs = raw[s.key].get(p, [])
            if not runs:
                continue
            m = {
                k: med([r[k] for r in runs])
                for k in runs[0]
                if isinstance(runs[0][k], (int, float)) or runs[0][k] is None
            }
            m["errors"] = sum(r["errors"] for r in runs)
            m["x_nginx"] = per_rep(
                raw, s.key, p, lambda r, ref: r["proxy_cpu_ms"] / ref["nginx"]["proxy_cpu_ms"]
            )
            m["rps_x_direct"] = per_rep(
                raw, s.key, p, lambda r, ref: r["rps"] / ref["direct"]["rps"]
            )
            m["added_p50"] = per_rep(raw, s.key, p, lambda r, ref, k=p50: r[k] - ref["direct"][k])
            m["added_p99"] = per_rep(raw, s.key, p, lambda r, ref, k=p99: r[k] - ref["direct"][k])
            m["d_cpu"] = per_rep(
                raw, s.key, p, lambda r, ref: r["proxy_cpu_ms"] - ref["off"]["proxy_cpu_ms"]
            )
            m["d_p50"] = per_rep(raw, s.key, p, lambda r, ref, k=p50: r[k] - ref["off"][k])
            m["d_p99"] = per_rep(raw, s.key, p, lambda r, ref, k=p99: r[k] - ref["off"][k])
            res[s.key][p] = m
    return res


# --- the bench -----------------------------------------------------------------------


def start_paths(b: Bench, paths: list[str]) -> dict[str, Target]:
    up = b.upstreams[0]
    targets: dict[str, Target] = {}
    if "direct" in paths:
        targets["direct"] = Target("direct", up.url, None)
    if "nginx" in paths:
        ng = procs.nginx(up.port).start("/health")
        b.others.append(ng)
        targets["nginx"] = Target("nginx", ng.url, ng)
    if "litellm" in paths:
        ll = procs.litellm(b.args.litellm, up.url).start("/health/liveliness")
        b.others.append(ll)
        targets["litellm"] = Target("litellm", ll.url, ll)
    assert b.redis is not None
    for p in paths:
        if p not in GATEWAYS:
            continue
        text, metrics = gateway_config(p, b.redis.url, [u.url for u in b.upstreams])
        workers = 2 if p.endswith("-w2") else 1
        env = {"VLLM_MODEL": "tiny-llama", "VLLM_WRAPPER_METRICS": str(metrics).lower()}
        gw = procs.gateway(up.url, workers, env)
        if text:
            cfg = b.tmp / f"{p}.toml"
            cfg.write_text(text)
            gw.args += ["--config", str(cfg)]
        gw.start("/health", workers=workers)
        b.others.append(gw)
        targets[p] = Target(p, gw.url, gw)
    return targets


def warm_up(b: Bench, targets: dict[str, Target]) -> None:
    """Imports, pools and caches in every server; not recorded."""
    warm_wrk = Scenario("warm", "", "wrk", 8)
    warm_burst = Scenario("warm", "", "stream", 64, mode="burst", tokens=8, bursts=2, gap=0.1)
    duration = b.args.duration
    b.args.duration = 1.0
    try:
        for t in targets.values():
            b.load(t, warm_wrk)
            r = b.load(t, warm_burst)
            if r["errors"]:
                raise RuntimeError(f"{t.name}: errors in the warm-up: {r}")
    finally:
        b.args.duration = duration


def upstream_compare(b: Bench, targets: dict[str, Target], repeat: int) -> dict:
    """fastup against proxy.sim, directly and behind nginx (wrk at saturation)."""
    sim = procs.sim(128).start("/health")
    ng_sim = procs.nginx(sim.port).start("/health")
    fast, ng_fast = b.upstreams[0], targets["nginx"].proxy
    rows: dict[str, list[dict]] = {}
    s = SCENARIOS[0]
    saved = b.upstreams
    try:
        for rep in range(repeat):
            runs = [
                ("direct → proxy.sim", Target("sim", sim.url, None), [sim]),
                ("direct → fastup", Target("fast", fast.url, None), [fast]),
                ("nginx → proxy.sim", Target("nginx-sim", ng_sim.url, ng_sim), [sim]),
            ]
            if ng_fast is not None:
                runs.append(("nginx → fastup", Target("nginx-fast", ng_fast.url, ng_fast), [fast]))
            k = rep % len(runs)
            for name, t, ups in runs[k:] + runs[:k]:
                b.upstreams = ups
                r = b.measure(t, s)
                r["upstream_util"] = r["upstream_cpu_ms"] * r["rps"] / 1000
                rows.setdefault(name, []).append(r)
                print(f"upstreams rep{rep} {name}: {brief(r)}", flush=True)
    finally:
        b.upstreams = saved
        ng_sim.stop()
        sim.stop()
    return rows


def workers_pinned(b: Bench, targets: dict[str, Target], repeat: int) -> dict:
    """all vs all-w2 with the gateway on CPU 1 and everything else on CPU 0."""
    rows: dict[str, list[dict]] = {}
    ncpu = os.cpu_count() or 1
    if ncpu < 2 or "all" not in targets or "all-w2" not in targets:
        return rows
    everything = set(range(ncpu))
    s = SCENARIOS[0]
    rest = [p for srv in [*b.upstreams, *b.others] for p in srv.pids()] + b.redis_pids()
    try:
        for rep in range(repeat):
            names = ["all", "all-w2"] if rep % 2 == 0 else ["all-w2", "all"]
            for name in names:
                t = targets[name]
                assert t.proxy is not None
                pin(rest, {0})
                pin(t.proxy.pids(), {1})
                r = b.measure(t, s, wrk_cpus="0")
                rows.setdefault(name, []).append(r)
                print(f"pinned rep{rep} {name}: {brief(r)}", flush=True)
    finally:
        pin(rest, everything)
    return rows


def brief(r: dict) -> str:
    keep = ("requests", "rps", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "errors")
    keep += ("proxy_cpu_ms", "upstream_cpu_ms", "foreign", "load_before", "attempts")
    keep += ("error_kinds",) if r.get("error_kinds") else ()
    return json.dumps(
        {k: round(r[k], 3) if isinstance(r[k], float) else r[k] for k in keep if k in r}
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.full", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--duration", type=float, default=3.0, help="seconds per timed run (default 3; S4 1.5×)"
    )
    p.add_argument("--only", default="", help="scenario keys, comma-separated (s1,s2a,s2b,s3..s6)")
    p.add_argument(
        "--paths",
        default="",
        help="gateway paths, comma-separated (direct and nginx always run): " + ",".join(GATEWAYS),
    )
    p.add_argument(
        "--foreign",
        type=float,
        default=0.10,
        help="discard a run when other processes used more than this share of one core "
        "during it (default 0.10)",
    )
    p.add_argument(
        "--retries", type=int, default=2, help="runs again per discarded run (default 2)"
    )
    p.add_argument(
        "--max-discards",
        type=int,
        default=40,
        help="stop repeating noisy runs after this many discards in all (default 40)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="seconds in all to wait for a quiet machine before runs (default 300)",
    )
    p.add_argument("--skip-extra", action="store_true", help="no fastup/sim or pinned workers runs")
    p.add_argument(
        "--litellm",
        metavar="EXE",
        default="",
        help="also run LiteLLM's proxy (the `litellm` command of a virtualenv of its own: "
        "python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]')",
    )
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = p.parse_args()
    procs.require_tools()
    only = set(filter(None, args.only.split(",")))
    scenarios = [s for s in SCENARIOS if not only or s.key in only]
    chosen = set(filter(None, args.paths.split(",")))
    unknown = chosen - set(GATEWAYS)
    if unknown:
        sys.exit(f"unknown paths: {', '.join(sorted(unknown))} (known: {', '.join(GATEWAYS)})")
    paths = [p for p in PATHS if p in ("direct", "nginx") or not chosen or p in chosen]
    if args.litellm:
        paths.insert(2, "litellm")
    started = time.monotonic()
    meta = {
        "command": " ".join(["python -m bench.full", *sys.argv[1:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": f"{os.getloadavg()[0]:.2f}",
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally)
    b = Bench(args)
    raw: dict[str, dict[str, list[dict]]] = {s.key: {p: [] for p in paths} for s in scenarios}
    extra: dict[str, dict] = {}
    with RedisServer() as redis_server:
        b.redis = redis_server
        try:
            for _ in range(2):
                fast = procs.Server("fastup", [sys.executable, "-m", "bench.fastup", "--port",
                                               str(port := procs.free_port())], port)  # fmt: skip
                b.upstreams.append(fast.start("/health"))
            targets = start_paths(b, paths)
            warm_up(b, targets)
            for rep in range(args.repeat):
                k = rep * len(paths) // args.repeat
                order = paths[k:] + paths[:k]
                for s in scenarios:
                    for name in order:
                        r = b.measure(targets[name], s)
                        raw[s.key][name].append(r)
                        print(f"{s.key} rep{rep} {name}: {brief(r)}", flush=True)
            if not args.skip_extra:
                extra["pinned"] = workers_pinned(b, targets, args.repeat)
                extra["upstream"] = upstream_compare(b, targets, args.repeat)
        finally:
            for srv in [*b.others, *b.upstreams]:
                srv.stop()
    meta["elapsed"] = time.monotonic() - started
    meta["load_after"] = f"{os.getloadavg()[0]:.2f}"
    Path(tempfile.gettempdir(), "bench-full-raw.json").write_text(json.dumps([raw, extra]))
    results = summarize(raw, scenarios, paths)
    section = render(results, raw, extra, scenarios, paths, b, args, meta)
    print(section)
    if args.no_write or only or chosen:
        print("(not written: --no-write, --only or --paths)")
        return
    write_results(section, BEGIN, END)
    print(f"wrote {RESULTS}")


# --- RESULTS.md ----------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if v is None else format(v, spec) + suffix


def render(
    res: dict,
    raw: dict,
    extra: dict,
    scenarios: list[Scenario],
    paths: list[str],
    b: Bench,
    args: argparse.Namespace,
    meta: dict,
) -> str:
    runs = [r for by_path in raw.values() for rs in by_path.values() for r in rs]
    loads = [r["load_before"] for r in runs]
    foreign = [r["foreign"] * 100 for r in runs]
    out = [
        BEGIN,
        "## Every feature on: gateway vs nginx vs direct, fast upstream",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Run: {meta['date']}, {meta['elapsed'] / 60:.1f} min; load average at the start / "
        f"end: {meta['load_before']} / {meta['load_after']}; before each run: min "
        f"{fmt(min(loads, default=None))}, median {fmt(med(loads))}, max "
        f"{fmt(max(loads, default=None))}.  ",
        f"Other load: CPU spent during a run by processes outside this bench (/proc/stat busy "
        f"time minus the bench's process tree), in % of one core: median {fmt(med(foreign), '.1f')}"
        f", max {fmt(max(foreign, default=None), '.1f')} over the {len(runs)} runs kept; "
        f"**{b.discarded} runs discarded** for more than {args.foreign:.0%} of a core and run "
        f"again (at most {args.max_discards} in all), {b.noisy} kept noisy after {args.retries} "
        "retries (the quietest attempt); "
        f"{b.waited:.0f} s spent waiting for a quiet moment before runs.  ",
        f"Medians of {args.repeat} repetitions; paths in rotating order within each; "
        f"{args.duration:g} s per timed run; ratios and differences are taken within a "
        "repetition, then the median of those.",
        "",
        "Upstream: `python -m bench.fastup` (one process; a second for **upstreams**/**all**). "
        "**direct** = client → fastup; **nginx** = 1 worker, `proxy_buffering off`, keep-alive "
        "upstream, `access_log off`; "
        + (
            f"**litellm** = LiteLLM {b.litellm_version} (`litellm --num_workers 1`, "
            "`hosted_vllm/` provider, no master key and no database: no auth, as **off**; "
            "client `x-` headers forwarded); "
            if "litellm" in paths
            else ""
        )
        + "gateway paths: 1 worker, `VLLM_WRAPPER_ACCESS_LOG=false`, "
        "**off** = no keys, no limits, `VLLM_WRAPPER_METRICS=false`, one upstream, no cache; "
        "**auth** = 100 `[[keys]]`; **limits** = those keys with `rpm`, `tpm`, `max_parallel` "
        "(too high to refuse) on `redis-server`; **metrics** = `VLLM_WRAPPER_METRICS=true`; "
        "**upstreams** = two fastups, `least-busy`; **cache** = `[cache] enabled`, every request "
        "a miss (unique bodies, `temperature` 0: looked up, generated, stored); **all** = all of "
        "these (the cache in Redis); **all-w2** = **all** with `--workers 2`. Every request: "
        "`POST /v1/chat/completions`, a unique body, the 100 keys in turn (ignored where no "
        "keys), 128 tokens unless said.",
        "",
        "CPU ms = utime+stime of the proxy's processes (all workers) per request or stream; "
        "× nginx = that / nginx's in the same repetition. Added = path − direct (latency for "
        "wrk, time to first token for streams) in the same repetition. Upstream CPU = fastup's "
        "CPU per request. Client = the load generator's CPU in % of a core. Nothing is pinned "
        f"(the workers table excepted): {os.cpu_count()} cores shared by client, upstream, proxy. "
        "Events/read = SSE events per read of the client: with tokens back to back (S3) a "
        "proxy that falls behind writes several tokens at once, which lowers its CPU per "
        "stream; with tokens 10 ms apart (S4) every token is a read and a write of its own.",
        "",
        "fastup's own CPU (direct path, median): "
        + ", ".join(
            f"{fmt(res[k]['direct']['upstream_cpu_ms'], '.3f')} ms per {what} ({k})"
            for k, what in (
                ("s1", "non-streaming response"),
                ("s3", "128-token stream, back to back"),
                ("s4", "128-token stream, paced"),
            )
            if k in res and "direct" in res[k]
        )
        + ".",
        "",
    ]
    for s in scenarios:
        rows = res[s.key]
        out += [f"### {s.title}", ""]
        unit = "req/s" if s.kind == "wrk" else "streams/s"
        lat = "latency" if s.kind == "wrk" else "TTFT"
        out += [
            f"| path | {unit} | × direct | {lat} p50 ms | {lat} p99 ms | added p50 / p99 ms | "
            f"CPU ms | × nginx | proxy CPU % | upstream CPU ms | client % | "
            f"{'events/read | ' if s.kind == 'stream' else ''}errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|"
            + ("---|" if s.kind == "stream" else "")
            + "---|",
        ]
        p50, p99 = latency_keys(s)
        for p in paths:
            m = rows.get(p)
            if m is None:
                continue
            added = "–" if p == "direct" else f"{fmt(m['added_p50'])} / {fmt(m['added_p99'])}"
            out.append(
                "| "
                + " | ".join(
                    [
                        p,
                        fmt(m["rps"], ".0f"),
                        fmt(m["rps_x_direct"], ".2f", "×"),
                        fmt(m[p50]),
                        fmt(m[p99]),
                        added,
                        fmt(m["proxy_cpu_ms"], ".3f"),
                        fmt(m["x_nginx"], ".1f", "×") if p not in ("direct", "nginx") else "–",
                        fmt(m["proxy_util"] * 100 if m["proxy_util"] else None, ".0f"),
                        fmt(m["upstream_cpu_ms"], ".3f"),
                        fmt(m["client_util"] * 100, ".0f"),
                        *([fmt(m["events_per_read"], ".1f")] if s.kind == "stream" else []),
                        str(m["errors"]),
                    ]
                )
                + " |"
            )
        out.append("")
    out += marginal(res, scenarios, paths)
    out += workers(res, extra)
    out += upstream_table(extra)
    out += targets(res, extra)
    out += ["", END]
    return "\n".join(out)


def marginal(res: dict, scenarios: list[Scenario], paths: list[str]) -> list[str]:
    keys = [s for s in scenarios]
    if "off" not in paths:
        return []
    columns = ["feature", *(f"{s.key} CPU" for s in keys)]
    columns += [f"{s.key} TTFT p50 / p99" for s in keys if s.kind == "stream"]
    columns.append("redis CPU ms (s1)")
    out = [
        "### Each feature's marginal cost (path − off, same repetition, medians)",
        "",
        "CPU: ms per request (S1, S2) or per stream (S3–S6), and in % of off's. TTFT: added "
        "ms at p50 / p99. Redis: redis-server's CPU ms per request. **limits** includes "
        "auth's cost (limits need keys): limits − auth is its own.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for p in [p for p in FEATURES if p in paths]:
        cells = [p]
        for s in keys:
            m = res[s.key].get(p, {})
            off = res[s.key].get("off", {}).get("proxy_cpu_ms")
            d = m.get("d_cpu")
            pct = f" ({d / off * 100:+.0f} %)" if d is not None and off else ""
            cells.append(fmt(d, "+.3f") + pct)
        for s in keys:
            if s.kind == "stream":
                m = res[s.key].get(p, {})
                cells.append(f"{fmt(m.get('d_p50'), '+.2f')} / {fmt(m.get('d_p99'), '+.2f')}")
        s1 = res.get("s1", {}).get(p, {})
        cells.append(fmt(s1.get("redis_cpu_ms"), ".3f") if p.startswith(("limits", "all")) else "–")
        out.append("| " + " | ".join(cells) + " |")
    if "auth" in paths and "limits" in paths:
        cells = ["limits − auth"]
        for s in keys:
            a, lim = res[s.key].get("auth", {}), res[s.key].get("limits", {})
            d = (
                lim["proxy_cpu_ms"] - a["proxy_cpu_ms"]
                if lim.get("proxy_cpu_ms") is not None and a.get("proxy_cpu_ms") is not None
                else None
            )
            cells.append(fmt(d, "+.3f"))
        for s in keys:
            if s.kind == "stream":
                a, lim = res[s.key].get("auth", {}), res[s.key].get("limits", {})
                d50 = (lim.get("d_p50") or 0) - (a.get("d_p50") or 0) if lim and a else None
                d99 = (lim.get("d_p99") or 0) - (a.get("d_p99") or 0) if lim and a else None
                cells.append(f"{fmt(d50, '+.2f')} / {fmt(d99, '+.2f')}")
        cells.append("–")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def workers(res: dict, extra: dict) -> list[str]:
    s1 = res.get("s1", {})
    pinned = extra.get("pinned") or {}
    if not ("all" in s1 and "all-w2" in s1) and not pinned:
        return []
    out = [
        "### `--workers 2` against 1 worker (all features, S1 saturation)",
        "",
        "This VM has 2 cores: the load generator and the upstream cannot get cores of their "
        "own while two workers have one each. **unpinned** = the S1 runs above (everything "
        "shares both cores). **pinned** = the gateway's processes on CPU 1, wrk, fastup, redis "
        "and every other server on CPU 0: both workers of all-w2 then share one core, which "
        "gives its throughput per core; with a core per worker and the rest elsewhere, the "
        "projection is 2 × that (each worker keeps its share of the 32 connections busy).",
        "",
        "| variant | all req/s | all-w2 req/s | w2 / w1 | all CPU ms/req | all-w2 CPU ms/req | "
        "gateway cores used (w1 / w2) | client+upstream cores (w1 / w2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if "all" in s1 and "all-w2" in s1:
        w1, w2 = s1["all"], s1["all-w2"]
        out.append(
            f"| unpinned | {w1['rps']:.0f} | {w2['rps']:.0f} | {w2['rps'] / w1['rps']:.2f}× | "
            f"{w1['proxy_cpu_ms']:.3f} | {w2['proxy_cpu_ms']:.3f} | "
            f"{w1['proxy_util']:.2f} / {w2['proxy_util']:.2f} | "
            f"{other_cores(w1):.2f} / {other_cores(w2):.2f} |"
        )
    if "all" in pinned and "all-w2" in pinned:
        w1 = {k: med([r[k] for r in pinned["all"]]) for k in pinned["all"][0] if k != "worker_cpu"}
        w2 = {
            k: med([r[k] for r in pinned["all-w2"]])
            for k in pinned["all-w2"][0]
            if k != "worker_cpu"
        }
        out.append(
            f"| pinned (gateway on 1 core) | {w1['rps']:.0f} | {w2['rps']:.0f} | "
            f"{w2['rps'] / w1['rps']:.2f}× | {w1['proxy_cpu_ms']:.3f} | {w2['proxy_cpu_ms']:.3f} | "
            f"{w1['proxy_util']:.2f} / {w2['proxy_util']:.2f} | "
            f"{other_cores(w1):.2f} / {other_cores(w2):.2f} |"
        )
        out.append(
            f"| projected: a core per worker | {w1['rps']:.0f} | {2 * w2['rps']:.0f} | "
            f"{2 * w2['rps'] / w1['rps']:.2f}× | | | | |"
        )
        shares = []
        for r in pinned["all-w2"]:
            busy = sorted(r["worker_cpu"], reverse=True)[:2]
            if sum(busy):
                shares.append(busy[0] / sum(busy))
        if shares:
            out += [
                "",
                f"Pinned all-w2: the busier worker did {med(shares) * 100:.0f} % of the two "
                "workers' CPU (median), so the kernel spread the connections "
                f"{'evenly' if med(shares) < 0.6 else 'unevenly'}.",
            ]
    out.append("")
    return out


def other_cores(m: dict) -> float:
    """Cores used by the load generator and the upstream (and redis) in a run."""
    n = m["rps"]
    return m["client_util"] + (m["upstream_cpu_ms"] + m["redis_cpu_ms"]) * n / 1000


def upstream_table(extra: dict) -> list[str]:
    rows = extra.get("upstream") or {}
    if not rows:
        return []
    out = [
        "### The upstream: fastup against the simulator (S1 load, wrk at saturation)",
        "",
        "Upstream CPU = the upstream process's CPU per response; nginx CPU = nginx's per "
        "request. The simulator saturates its core first and caps nginx's rate (and raises "
        "nginx's CPU per request: fewer requests per wake-up).",
        "",
        "| path | req/s | p50 ms | upstream CPU ms/resp | upstream core % | nginx CPU ms/req |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        out.append(
            f"| {name} | {med([r['rps'] for r in rs]):.0f} | {med([r['p50_ms'] for r in rs]):.2f} "
            f"| {med([r['upstream_cpu_ms'] for r in rs]):.4f} | "
            f"{med([r['upstream_util'] for r in rs]) * 100:.0f} | "
            f"{fmt(med([r['proxy_cpu_ms'] for r in rs]), '.4f')} |"
        )
    out.append("")
    return out


def targets(res: dict, extra: dict) -> list[str]:
    out = [
        "### Targets of issue 18 (all features on, 1 worker, against nginx in the same run)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]

    def row(name: str, value: float | None, limit: float | None, text: str) -> None:
        if value is None or limit is None:
            out.append(f"| {name} | not measured | – |")
            return
        out.append(f"| {name} | {text} | {'yes' if value <= limit else '**no**'} |")

    def get(key: str, path: str, field: str) -> float | None:
        return res.get(key, {}).get(path, {}).get(field)

    v = get("s1", "all", "x_nginx")
    row("CPU per non-streaming request ≤ 5× nginx at saturation (S1)", v, 5, f"{fmt(v, '.1f')}×")
    for key, rate in (("s2a", "500"), ("s2b", "2,000")):
        v = get(key, "all", "x_nginx")
        row(f"CPU per non-streaming request ≤ 4× nginx at {rate} req/s", v, 4, f"{fmt(v, '.1f')}×")
    v = get("s3", "all", "x_nginx")
    row("CPU per 128-token stream ≤ 1.5× nginx (S3, tokens back to back)", v, 1.5,
        f"{fmt(v, '.2f')}×")  # fmt: skip
    v = get("s4", "all", "x_nginx")
    row("CPU per 128-token stream ≤ 1.5× nginx (S4, tokens 10 ms apart)", v, 1.5,
        f"{fmt(v, '.2f')}×")  # fmt: skip
    v = get("s4", "all", "added_p50")
    row("added TTFT p50 ≤ 0.5 ms, steady arrivals (S4)", v, 0.5, f"{fmt(v)} ms")
    v = get("s4", "all", "added_p99")
    row("added TTFT p99 ≤ 2 ms, steady arrivals (S4)", v, 2, f"{fmt(v)} ms")
    v = get("s5", "all", "added_p50")
    row("added TTFT p50 ≤ 3 ms, 64 streams at once (S5)", v, 3, f"{fmt(v)} ms")
    for q in ("p50", "p99"):
        v, n = get("s6", "all", f"added_{q}"), get("s6", "nginx", f"added_{q}")
        limit = 3 * n if n is not None else None
        row(
            f"added TTFT {q}, 500 streams at once (S6) ≤ 3× nginx's",
            v,
            limit,
            f"{fmt(v)} ms vs nginx {fmt(n)} ms (limit {fmt(limit)} ms)",
        )
    w1, w2 = res.get("s1", {}).get("all"), res.get("s1", {}).get("all-w2")
    if w1 and w2:
        ratio = w2["rps"] / w1["rps"]
        row("`--workers 2` ≥ 1.7× one worker's throughput, unpinned (S1)", -ratio, -1.7,
            f"{ratio:.2f}×")  # fmt: skip
    pinned = extra.get("pinned") or {}
    if "all" in pinned and "all-w2" in pinned:
        r1 = med([r["rps"] for r in pinned["all"]])
        r2 = med([r["rps"] for r in pinned["all-w2"]])
        ratio = 2 * r2 / r1
        row("`--workers 2` ≥ 1.7×, projected from the pinned runs", -ratio, -1.7, f"{ratio:.2f}×")
    errors = sum(
        m["errors"] for by_path in res.values() for p, m in by_path.items() if p in GATEWAYS
    )
    row("zero errors (every gateway path, scenario and repetition)", errors, 0, str(errors))
    return out


if __name__ == "__main__":
    main()
