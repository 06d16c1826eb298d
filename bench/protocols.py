"""CPU per request of uvicorn's HTTP protocols: httptools, the gateway's bounded one, h11.

    python -m bench.protocols micro   # in-process: the protocol layer alone (µs/request)
    python -m bench.protocols wrk     # the gateway under wrk in front of the simulator

``micro`` feeds one keep-alive connection 20 000 requests (a 230-byte POST like the
bench's) through each protocol with a trivial ASGI app and an in-memory transport,
and takes process CPU time; ``wrk`` starts the gateway under each protocol in turn
(rotating the order per repetition) and measures its CPU per non-streaming request at
concurrency 32, as ``bench.run`` does. Both print the per-repetition figures and the
medians. Used to choose the request-head limits of issue 12 (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from bench import procs
from bench.run import WRK_LUA, run_wrk

KINDS = ("httptools", "bounded", "h11")
REQUEST = (
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8001\r\nContent-Type: application/json\r\n"
    b"x-sim-tokens: 128\r\nContent-Length: 80\r\n\r\n"
    + b'{"model":"tiny-llama","prompt":"Say something long.","max_tokens":4096}'.ljust(80)
)


def _http_option(kind: str) -> dict[str, Any]:
    from proxy.server import HttpLimits

    return {
        "httptools": {"http": "httptools"},
        "bounded": {"http": HttpLimits()},
        "h11": {"http": "h11", "h11_max_incomplete_event_size": 64 * 1024},
    }[kind]


# -- micro --------------------------------------------------------------------------------


async def _ok(scope: dict, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})


class _Transport:
    """Just enough of an asyncio transport for a protocol to serve into memory."""

    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _micro_once(kind: str, n: int) -> float:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    config = Config(app=_ok, lifespan="off", access_log=False, **_http_option(kind))
    config.load()
    state = ServerState()
    protocol = config.http_protocol_class(config=config, server_state=state, app_state={})
    protocol.connection_made(_Transport())
    start = time.process_time()
    for _ in range(n):
        protocol.data_received(REQUEST)
        while state.tasks:
            await asyncio.sleep(0)
    used = time.process_time() - start
    protocol.connection_lost(None)
    return used / n * 1e6


def micro(reps: int, n: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {k: [] for k in KINDS}
    for rep in range(reps):
        for kind in KINDS[rep % 3 :] + KINDS[: rep % 3]:
            results[kind].append(asyncio.run(_micro_once(kind, n)))
    return results


# -- wrk ----------------------------------------------------------------------------------

_SERVE = """
import sys, uvicorn
from proxy.cli import tune_gc
from proxy.config import Settings
from proxy.gateway import create_app
from bench.protocols import _http_option
kind, port, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = create_app(Settings(base_url=base, model="tiny-llama"))
tune_gc()
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
            **_http_option(kind))
"""


def wrk(reps: int, duration: float) -> dict[str, list[float]]:
    from tests.support.servers import free_port, sim_server

    results: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(WRK_LUA)
        lua.flush()
        with sim_server("--model", "tiny-llama") as sim:
            for rep in range(reps):
                for kind in KINDS[rep % 3 :] + KINDS[: rep % 3]:
                    port = free_port()
                    args = [sys.executable, "-c", _SERVE, kind, str(port), sim.url + "/v1"]
                    proc = subprocess.Popen(args, cwd=procs.ROOT, stdout=subprocess.DEVNULL)
                    url = f"http://127.0.0.1:{port}"
                    try:
                        for _ in range(200):
                            try:
                                httpx.get(url + "/health", timeout=1)
                                break
                            except httpx.HTTPError:
                                time.sleep(0.05)
                        run_wrk(url, 32, 2, lua.name)  # warm-up
                        cpu0 = procs.cpu_seconds([proc.pid])
                        r = run_wrk(url, 32, duration, lua.name)
                        cpu = procs.cpu_seconds([proc.pid]) - cpu0
                        results[kind].append(cpu * 1000 / max(1, r["requests"]))
                    finally:
                        proc.terminate()
                        proc.wait(10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("micro", "wrk"))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20_000, help="micro: per repetition")
    parser.add_argument("--duration", type=float, default=6.0, help="wrk: seconds per run")
    args = parser.parse_args()
    if args.mode == "micro":
        results, unit = micro(args.reps, args.requests), "µs"
    else:
        results, unit = wrk(args.reps, args.duration), "ms"
    for kind, values in results.items():
        figures = " ".join(f"{v:.3f}" for v in values)
        print(f"{kind:10} median {statistics.median(values):.3f} {unit}/request  ({figures})")


if __name__ == "__main__":
    main()
