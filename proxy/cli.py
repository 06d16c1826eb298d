"""``python -m proxy``: command line → Settings → uvicorn. The only module that exits."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy.config import ENV_VARS, ConfigError, Settings

if TYPE_CHECKING:
    from starlette.applications import Starlette

_SETTINGS_HELP = "\n".join(f"  {var}" for var in ENV_VARS)


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

    app = create_app()
    own_process()
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy",
        description="vllm-wrapper: an OpenAI-compatible gateway for vLLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Settings come from the environment and a .env file (the environment wins);\n"
            "command-line options win over both. Variables (see README for meanings):\n"
            + _SETTINGS_HELP
        ),
    )
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
        "--log-level",
        help="critical, error, warning, info, debug (VLLM_WRAPPER_LOG_LEVEL, default info)",
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
    return Settings.from_env()


def log_config(level: str) -> dict[str, object]:
    """uvicorn's logging, plus our own loggers on stdout."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict = {**LOGGING_CONFIG}
    config["formatters"] = {
        **LOGGING_CONFIG["formatters"],
        "gateway": {
            "()": "logging.Formatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        },
    }
    config["handlers"] = {
        **LOGGING_CONFIG["handlers"],
        "gateway": {
            "formatter": "gateway",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
        },
    }
    upper = "DEBUG" if level == "trace" else level.upper()
    config["loggers"] = {
        **LOGGING_CONFIG["loggers"],
        "proxy": {"handlers": ["gateway"], "level": upper, "propagate": False},
    }
    return config


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        sys.exit(2)
    try:
        settings = resolve_settings(args)
    except ConfigError as exc:
        print(f"error: invalid setting {exc}", file=sys.stderr)
        sys.exit(2)

    import uvicorn

    from proxy.gateway import create_app

    options: dict = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": log_config(settings.log_level),
        "access_log": False,  # the gateway logs one line per request itself
        "timeout_graceful_shutdown": settings.graceful_timeout,
    }
    if settings.demo and args.workers > 1:
        print("error: --demo runs a single worker", file=sys.stderr)
        sys.exit(2)
    made_dir = setup_metrics_dir(settings, args.workers)
    try:
        if settings.demo:
            asyncio.run(serve_demo(settings, options))
        elif args.workers > 1:
            uvicorn.run("proxy.cli:worker_app", factory=True, workers=args.workers, **options)
        else:
            app = create_app(settings)
            own_process()
            uvicorn.run(app, **options)
    except ConfigError as exc:
        print(f"error: invalid setting {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if made_dir:
            shutil.rmtree(made_dir, ignore_errors=True)


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
    import uvicorn

    from proxy.gateway import create_app
    from proxy.sim.app import create_sim_app
    from proxy.sim.options import SimOptions

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        sim_port = s.getsockname()[1]
    models = (settings.model,) if settings.model == "tiny-llama" else (settings.model, "tiny-llama")
    # A short pause between tokens makes streaming visible to a person watching.
    sim_options = SimOptions(models=models, port=sim_port, token_delay=0.02)
    sim = uvicorn.Server(
        uvicorn.Config(
            create_sim_app(sim_options),
            host="127.0.0.1",
            port=sim_port,
            log_level="warning",
            access_log=False,
        )
    )
    settings = settings.replace(base_url=f"http://127.0.0.1:{sim_port}/v1")
    gateway = uvicorn.Server(uvicorn.Config(create_app(settings), **options))
    sim_task = asyncio.create_task(sim.serve())
    while not sim.started:
        if sim_task.done():
            await sim_task  # surfaces why it could not start
            return
        await asyncio.sleep(0.01)
    print(
        f"demo: simulated vLLM serving {', '.join(models)} on {settings.base_url}; "
        f"gateway on http://{settings.host}:{settings.port}",
        flush=True,
    )
    try:
        await gateway.serve()
    finally:
        sim.should_exit = True
        await sim_task
