"""``python -m proxy``: command line → Settings → uvicorn. The only module that exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import logging.config
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from proxy.config import ENV_VARS, ConfigError, Settings
from proxy.logs import uvicorn_log_config
from proxy.startup import listen_url, startup_line, startup_warnings
from proxy.version import VERSION

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger("proxy.startup")


def settings_help() -> str:
    """Every variable with its meaning and default, from the table settings are parsed from."""
    width = max(map(len, ENV_VARS)) + 2
    lines = [
        f"  {var:<{width}}{spec.meaning} (default: {spec.default_text()})"
        for var, spec in ENV_VARS.items()
    ]
    return "\n".join(lines)


# Young-generation threshold of the cyclic GC in a server process (Python's default is 700).
GC_THRESHOLD = 10_000


def tune_gc() -> None:
    """Cheaper garbage collection for a long-running server process we own.

    The relay creates no reference cycles, yet with dozens of requests in flight the
    default threshold ran a young collection every few requests and promoted their
    short-lived objects, which set off full collections over the whole heap (15-30 ms
    pauses, ~10 % of the CPU; bench/RESULTS.md). Freezing what start-up built takes it
    out of every later collection; the higher threshold makes young ones rare.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def own_process() -> None:
    """Process-wide defaults for a process ``python -m proxy`` owns (not a host app's).

    :func:`tune_gc`, and no ``*_created`` series beside each counter and histogram
    (prometheus-client's default doubles the series count; Prometheus users rarely
    want them, and multiprocess mode has none).
    """
    from prometheus_client import disable_created_metrics

    tune_gc()
    disable_created_metrics()


def worker_app() -> Starlette:
    """The app factory each ``--workers`` process runs: the gateway, then :func:`own_process`."""
    from proxy.gateway import create_app
    from proxy.reload import signal_parent

    app = create_app(reload_fan_out=signal_parent)
    own_process()
    return app


def run_workers(options: dict, workers: int) -> None:
    """uvicorn's multi-process supervisor, except that ``SIGHUP`` reloads the config file in
    every worker (forwarded to each) instead of restarting them."""
    import signal

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    class ForwardHup(Multiprocess):
        def handle_hup(self) -> None:
            for process in self.processes:
                if process.pid is not None:
                    os.kill(process.pid, signal.SIGHUP)

    config = uvicorn.Config("proxy.cli:worker_app", factory=True, workers=workers, **options)
    ForwardHup(config, sockets=[config.bind_socket()]).run()


def check_config(settings: Settings) -> str:
    """Read and check the configuration file as start-up would; its summary, or ConfigError."""
    from proxy.configfile import load
    from proxy.routing.router import Router, upstream_specs

    if not settings.config_path:
        raise ConfigError("no configuration file: give --config PATH or VLLM_WRAPPER_CONFIG")
    config = load(settings.config_path)
    router = Router(settings, upstream_specs(settings, config), config.routing)
    return (
        f"{settings.config_path}: ok ({len(router.endpoints)} upstream(s), "
        f"policy {router.rules.policy})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="vllm-wrapper: an OpenAI-compatible gateway for vLLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Settings come from the environment and a .env file (the environment wins);\n"
            "command-line options win over both. Variables:\n\n" + settings_help()
        ),
    )
    parser.add_argument("--version", action="version", version=f"vllm-wrapper {VERSION}")
    parser.add_argument("--host", help="listen address (VLLM_WRAPPER_HOST, default 0.0.0.0)")
    parser.add_argument("--port", help="listen port (VLLM_WRAPPER_PORT, default 8001)")
    parser.add_argument(
        "--env-file",
        default=None,
        help="file of KEY=VALUE settings to read (default .env in the working directory; "
        "'' reads none)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (default 1; use about one per core)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        default=None,
        help="serve in front of a built-in simulated vLLM on a free loopback port (no GPU "
        "needed; VLLM_BASE_URL is ignored; VLLM_WRAPPER_DEMO)",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML configuration file: [[upstreams]], [routing], [[keys]], [limits], [state]... "
        "(VLLM_WRAPPER_CONFIG); "
        "SIGHUP or POST /admin/reload re-reads it",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration file and exit: 0 when valid, else 1 with the error",
    )
    parser.add_argument(
        "--log-level",
        help="critical, error, warning, info, debug (VLLM_WRAPPER_LOG_LEVEL, default info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    check = commands.add_parser(
        "check",
        help="probe a running gateway as a client would and print a verdict",
        description="Probe a running gateway as a client would: /health, /models, a short "
        "/chat, a short stream with its time to first token, and the answer without a key. "
        "Exit status 0 when every check passed, 1 otherwise.",
    )
    check.add_argument("url", help="the gateway's URL, e.g. https://you--vllm-wrapper.modal.run")
    check.add_argument("--key", default="", help="the gateway's API key (VLLM_WRAPPER_API_KEY)")
    check.add_argument(
        "--model", default=None, help="model for the chat checks (default: the gateway's)"
    )
    check.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request (default: 60)"
    )
    return parser


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Apply command-line overrides through the environment, so worker processes agree."""
    if args.env_file is not None:
        os.environ["VLLM_WRAPPER_ENV_FILE"] = args.env_file
    if args.host is not None:
        os.environ["VLLM_WRAPPER_HOST"] = args.host
    if args.port is not None:
        os.environ["VLLM_WRAPPER_PORT"] = args.port
    if args.log_level is not None:
        os.environ["VLLM_WRAPPER_LOG_LEVEL"] = args.log_level
    if args.demo:
        os.environ["VLLM_WRAPPER_DEMO"] = "true"
    if args.config is not None:
        os.environ["VLLM_WRAPPER_CONFIG"] = args.config
    settings = Settings.from_env()
    if settings.demo and args.host is None and not os.environ.get("VLLM_WRAPPER_HOST"):
        # The demo has no key: keep it on this machine unless a host is asked for.
        os.environ["VLLM_WRAPPER_HOST"] = "127.0.0.1"
        settings = settings.replace(host="127.0.0.1")
    return settings


# Kept under its old name for callers of proxy.cli.log_config.
log_config = uvicorn_log_config


class GatewayServer(uvicorn.Server):
    """uvicorn's server, which says what runs once its socket is bound, and stops at once
    on a second Ctrl-C (or SIGTERM) instead of waiting out the grace period."""

    def __init__(self, config: uvicorn.Config, banner: Callable[[int], str]) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started or self.should_exit:
            return
        port = self.config.port
        for server in self.servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
        log.info("%s", self.banner(port))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig in (signal.SIGINT, signal.SIGTERM) and not self.force_exit:
            log.warning("second stop signal: stopping now, cutting requests still in flight")
            self.force_exit = True
            try:
                asyncio.get_running_loop().call_soon_threadsafe(self._cut_everything)
            except RuntimeError:
                pass
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        if self.force_exit:
            # uvicorn skips the lifespan shutdown on a forced exit, and the lifespan task,
            # cancelled when the loop closes, logs a traceback. The requests are cut
            # already, so the app's own shutdown (closing the upstream pool) is quick.
            await self.lifespan.shutdown()

    def _cut_everything(self) -> None:
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        for task in list(self.server_state.tasks):
            task.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        from proxy.check import run_check

        sys.exit(run_check(args.url, key=args.key, model=args.model, timeout=args.timeout))
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        sys.exit(2)
    # Formatted like the server's own lines from the first warning (unknown variables...).
    logging.config.dictConfig(uvicorn_log_config(args.log_level or "info"))
    try:
        settings = resolve_settings(args)
    except ConfigError as exc:
        print(f"error: invalid setting {exc}", file=sys.stderr)
        sys.exit(1 if args.check_config else 2)
    if args.check_config:
        try:
            print(check_config(settings))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        return
    if settings.config_path and args.workers > 1:
        try:  # one clear line here rather than one per worker
            check_config(settings)
        except ConfigError as exc:
            print(f"error: invalid configuration file: {exc}", file=sys.stderr)
            sys.exit(2)

    from proxy.server import HttpLimits

    options: dict = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": uvicorn_log_config(settings.log_level),
        "access_log": False,  # the gateway logs one line per request itself
        "timeout_graceful_shutdown": settings.graceful_timeout,
        # httptools with the request head bounded in size and time (proxy/server.py)
        "http": HttpLimits(
            settings.max_header_bytes, settings.header_timeout, settings.send_timeout
        ),
    }
    for warning in startup_warnings(settings, settings.host):
        log.warning("%s", warning)
    if settings.demo and args.workers > 1:
        print("error: --demo runs a single worker", file=sys.stderr)
        sys.exit(2)
    made_dir = setup_metrics_dir(settings, args.workers)
    try:
        serve(settings, options, args.workers)
    finally:
        if made_dir:
            shutil.rmtree(made_dir, ignore_errors=True)


def serve(settings: Settings, options: dict, workers: int) -> None:
    """Run the gateway as the settings and options say (demo, workers, or one process)."""
    from proxy.gateway import create_app

    if settings.demo:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_demo(settings, options))
    elif workers > 1:
        url = listen_url(settings.host, settings.port)
        log.info("%s; workers %d", startup_line(settings, url), workers)
        run_workers(options, workers)
    else:
        try:
            app = create_app(settings)
        except ConfigError as exc:
            print(f"error: invalid configuration file: {exc}", file=sys.stderr)
            sys.exit(2)
        own_process()
        config = uvicorn.Config(app, **options)
        server = GatewayServer(
            config, lambda port: startup_line(settings, listen_url(settings.host, port))
        )
        with contextlib.suppress(KeyboardInterrupt):  # the re-raised SIGINT, as uvicorn.run
            server.run()
        if not server.started:
            sys.exit(3)  # uvicorn's STARTUP_FAILURE; it logged why


def setup_metrics_dir(settings: Settings, workers: int) -> str | None:
    """prometheus-client's multiprocess directory, so ``/metrics`` covers every worker.

    With ``--workers N`` (N > 1) and metrics on, a fresh temporary directory is made
    (returned, so the caller removes it at exit) unless ``PROMETHEUS_MULTIPROC_DIR``
    names one; a named directory is emptied of a previous run's metric files.
    """
    from proxy.metrics import prepare_multiproc_dir
    from proxy.metrics import resolve as resolve_metrics

    if not resolve_metrics(settings)[0]:
        return None
    if settings.metrics_dir:
        prepare_multiproc_dir(settings.metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = settings.metrics_dir  # e.g. from .env
        return None
    if workers == 1:
        return None
    path = tempfile.mkdtemp(prefix="vllm-wrapper-metrics-")
    # Before uvicorn starts the workers: each reads it when it imports prometheus-client.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


async def serve_demo(settings: Settings, options: dict) -> None:
    """The gateway and the simulated vLLM in one process and one event loop."""
    from proxy.gateway import create_app
    from proxy.sim.app import create_sim_app
    from proxy.sim.options import SimOptions

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        sim_port = s.getsockname()[1]
    models = (settings.model,) if settings.model == "tiny-llama" else (settings.model, "tiny-llama")
    # A short pause between tokens makes streaming visible to a person watching.
    sim_options = SimOptions(models=models, port=sim_port, token_delay=0.02)
    # log_config/log_level None: leave the process's logging to the gateway's config.
    sim_config = uvicorn.Config(
        create_sim_app(sim_options),
        host="127.0.0.1",
        port=sim_port,
        log_config=None,
        log_level=None,
        access_log=False,
        lifespan="off",
    )
    sim_config.load()
    sim = QuietServer(sim_config)
    settings = settings.replace(base_url=f"http://127.0.0.1:{sim_port}/v1")
    upstream = f"simulated vLLM (demo) at {settings.base_url} serving {', '.join(models)}"
    gateway = GatewayServer(
        uvicorn.Config(create_app(settings), **options),
        lambda port: startup_line(settings, listen_url(settings.host, port), upstream=upstream),
    )
    # Only the socket and the lifespan-less app: no main loop, signals or lines of its own;
    # the gateway's server owns the process, its signals and its one start-up line.
    sim.lifespan = sim_config.lifespan_class(sim_config)
    await sim.startup()
    try:
        await gateway.serve()
    finally:
        for server in sim.servers:
            server.close()
        for connection in list(sim.server_state.connections):
            connection.shutdown()


class QuietServer(uvicorn.Server):
    """The demo's simulated vLLM: a uvicorn server that does not announce itself."""

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        pass
