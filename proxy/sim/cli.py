"""``python -m proxy.sim``: argparse → SimOptions → uvicorn. The only module that exits."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from proxy.config import Settings

from .options import SimOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m proxy.sim",
        description=(
            "A simulated vLLM 0.32 OpenAI-compatible server: vLLM's wire format, made-up "
            "answers, fault switches under /_sim/. For demos, tests and benchmarks."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default: %(default)s)")
    p.add_argument(
        "--model",
        default=f"{Settings().model},tiny-llama",
        help="served model names, separated by commas; the first is the default (it is the "
        "gateway's default VLLM_MODEL, so the two work together as they are) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        metavar="N",
        help="force every generation to exactly min(N, max_tokens) tokens (benchmarks)",
    )
    p.add_argument(
        "--token-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="pause between two tokens (default: 0)",
    )
    p.add_argument(
        "--first-token-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="pause before the first token, i.e. time to first token (default: 0)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="context length: prompt plus output tokens (default: %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (as vLLM's --api-key)",
    )
    p.add_argument(
        "--no-embeddings",
        action="store_true",
        help="no /v1/embeddings route (404), like a real vLLM serving a generative model",
    )
    p.add_argument(
        "--max-running",
        type=int,
        default=None,
        metavar="N",
        help="run at most N generations at once; the rest queue (vllm:num_requests_waiting)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default: %(default)s)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request (off by default, for benchmark speed)",
    )
    return p


def parse_options(argv: Sequence[str] | None = None) -> SimOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = tuple(m.strip() for m in args.model.split(",") if m.strip())
    try:
        return SimOptions(
            models=models,
            max_model_len=args.max_model_len,
            tokens=args.tokens,
            token_delay=args.token_delay,
            first_token_delay=args.first_token_delay,
            api_key=args.api_key or None,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            embeddings=not args.no_embeddings,
            max_running=args.max_running,
        )
    except ValueError as exc:
        parser.error(str(exc))


def _configure_logging(level: str) -> None:
    """uvicorn configures only its own loggers; give ours the same look."""
    log = logging.getLogger("proxy.sim")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if level == "trace" else level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from .app import create_sim_app

    options = parse_options(argv)
    _configure_logging(options.log_level)
    uvicorn.run(
        create_sim_app(options),
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        access_log=options.access_log,
        loop="auto",
        http="auto",
        lifespan="on",
        timeout_keep_alive=5,
    )
    return 0
