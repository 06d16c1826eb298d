"""Cost of a response-cache hit: latency and the serving process's CPU per request for a
hit against a direct request to the simulated vLLM, a gateway miss (the answer generated),
and — when nginx is installed — nginx's ``proxy_cache`` of the same response, in one run;
a short answer (128 tokens) and a long one (about 1 MB).

    python -m bench.cache [--duration 4] [--concurrency 8]

Paths, each measured with wrk (non-streaming ``/v1/completions``, ``temperature`` 0):
**direct** the simulator itself (every request generates); **miss** the gateway with
``[cache] enabled`` and ``Cache-Control: no-cache`` (every request generates and is
stored); **hit** the same gateway, the entry already stored; **nginx-cache** nginx in
front of the simulator with ``proxy_cache`` keyed on URI + body (needs ``nginx`` on PATH).
CPU = the serving process's CPU seconds during the run / requests (the simulator's for
direct). The section between the markers in bench/RESULTS.md is rewritten.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from bench import procs
from bench.run import run_wrk, write_results

BEGIN, END = "<!-- cache:begin -->", "<!-- cache:end -->"
SIZES = {"short": 128, "long": 225000}  # the long answer is about 1 MB

NGINX_CACHE_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    proxy_cache_path {prefix}/cache keys_zone=answers:10m max_size=256m;
    upstream sim {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_body_buffer_size 64k;
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache answers;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 1h;
            proxy_buffers 64 64k;
        }}
    }}
}}
"""


def lua(tokens: int, extra: str = "") -> str:
    body = f'{{"model":"tiny-llama","prompt":"cache bench","max_tokens":{tokens},"temperature":0}}'
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["x-sim-tokens"] = "{tokens}"\n' + extra
    )


def nginx_cache(upstream_port: int) -> procs.Server:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = tempfile.mkdtemp(prefix="bench-nginx-cache-")
    os.chmod(prefix, 0o777)
    port = procs.free_port()
    conf = Path(prefix) / "nginx.conf"
    conf.write_text(NGINX_CACHE_CONF.format(prefix=prefix, port=port, upstream_port=upstream_port))
    args = [exe, "-c", str(conf), "-p", prefix, "-e", f"{prefix}/error.log", "-g", "daemon off;"]
    if os.geteuid() == 0:
        args = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *args]
    return procs.Server("nginx", args, port)


def measure(server: procs.Server, url: str, script: Path, args: argparse.Namespace) -> dict:
    run_wrk(url, args.concurrency, 1, str(script))  # warm-up (and, for hits, the store)
    cpu0 = procs.cpu_seconds(server.pids())
    out = run_wrk(url, args.concurrency, args.duration, str(script))
    out["cpu_ms"] = (procs.cpu_seconds(server.pids()) - cpu0) * 1000 / max(out["requests"], 1)
    return out


def answer_bytes(url: str, tokens: int) -> int:
    body = {"model": "tiny-llama", "prompt": "cache bench", "max_tokens": tokens, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, headers={"x-sim-tokens": str(tokens)})
    r.raise_for_status()
    return len(r.content)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    config = tmp / "cache.toml"
    config.write_text("[cache]\nenabled = true\n")
    have_nginx = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
    rows: list[tuple[str, str, int, dict | None]] = []
    sim = procs.sim(128)
    sim.args += ["--max-model-len", "1000000"]  # room for the long answer
    sim.start("/health")
    try:
        gw = procs.gateway(sim.url, 1)
        gw.args += ["--config", str(config)]
        gw.start("/health")
        ng = nginx_cache(sim.port).start("/health") if have_nginx else None
        try:
            for size, tokens in SIZES.items():
                n = answer_bytes(sim.url, tokens)
                plain = tmp / f"{size}.lua"
                plain.write_text(lua(tokens))
                fresh = tmp / f"{size}-no-cache.lua"
                fresh.write_text(lua(tokens, 'wrk.headers["Cache-Control"] = "no-cache"\n'))
                rows.append(("direct", size, n, measure(sim, sim.url, plain, args)))
                rows.append(("miss", size, n, measure(gw, gw.url, fresh, args)))
                rows.append(("hit", size, n, measure(gw, gw.url, plain, args)))
                nginx_row = measure(ng, ng.url, plain, args) if ng is not None else None
                rows.append(("nginx-cache", size, n, nginx_row))
        finally:
            gw.stop()
            if ng is not None:
                ng.stop()
    finally:
        sim.stop()
    when = time.gmtime(started)
    lines = [
        BEGIN,
        "## Response cache: a hit's cost",
        "",
        f"Command: `python -m bench.cache --duration {args.duration:g} "
        f"--concurrency {args.concurrency}`  ",
        f"Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}; run {time.strftime('%Y-%m-%d %H:%M UTC', when)}, "
        f"{time.time() - started:.0f} s, one repetition, wrk at concurrency {args.concurrency}.",
        "",
        "**direct**: the simulator itself; **miss**: the gateway generating (and storing) "
        "each answer (`Cache-Control: no-cache`); **hit**: the gateway replaying the stored "
        "answer; **nginx-cache**: nginx `proxy_cache` in front of the simulator. CPU = the "
        "serving process's CPU per request.",
        "",
        "| answer | path | bytes | req/s | p50 ms | p99 ms | CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, size, n, r in rows:
        if r is None:
            lines.append(
                f"| {size} | {path} | {n} | not measured: nginx is not installed | | | | |"
            )
            continue
        lines.append(
            f"| {size} | {path} | {n} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['cpu_ms']:.3f} | {r['errors']} |"
        )
    lines.append(END)
    section = "\n".join(lines)
    write_results(section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
