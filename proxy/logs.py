"""The gateway's log format, whichever server runs it.

``python -m proxy`` hands uvicorn a logging config (:func:`uvicorn_log_config`).
Another server (``uvicorn proxy:app``, hypercorn, granian) configures only its own
loggers, so the gateway's access and warning lines would reach Python's last-resort
handler (no time, no level, no access lines). :func:`ensure_gateway_logging` gives
the ``proxy`` logger the same handler then — unless the host configured logging
itself (a handler on ``proxy`` or on the root logger), which wins.

:class:`ServerNoiseFilter` turns two of uvicorn's messages about requests the gateway
ended on purpose into one line each (README, "Logs").
"""

from __future__ import annotations

import asyncio
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_HANDLER_NAME = "vllm-wrapper"


def _level(level: str) -> int:
    return logging.DEBUG if level == "trace" else getattr(logging, level.upper(), logging.INFO)


def ensure_gateway_logging(level: str | None = None) -> None:
    """Give the ``proxy`` logger a stdout handler in our format, if nothing logs it yet
    (then, or when it is ours already, ``level`` sets its level)."""
    logger = logging.getLogger("proxy")
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        if logger.handlers or logging.getLogger().handlers:
            return
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        quiet_server_noise()
    if level is not None:
        logger.setLevel(_level(level))


class ServerNoiseFilter(logging.Filter):
    """uvicorn's lines about requests the gateway ended on purpose, made short.

    - A request cancelled at the shutdown deadline is logged by uvicorn as
      ``Exception in ASGI application`` with a ``CancelledError`` traceback (~35 lines):
      it becomes one warning line.
    - ``ASGI callable returned without completing response.`` follows every stream the
      gateway cuts because the upstream failed mid-response; the gateway has already
      logged a line naming the cause, so this one is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            record.msg = (
                "request cancelled: the shutdown grace period "
                "(VLLM_WRAPPER_GRACEFUL_TIMEOUT) ran out"
            )
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        return record.getMessage() != "ASGI callable returned without completing response."


def quiet_server_noise() -> None:
    """Install :class:`ServerNoiseFilter` on uvicorn's error logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ServerNoiseFilter) for f in logger.filters):
        logger.addFilter(ServerNoiseFilter())


def uvicorn_log_config(level: str) -> dict[str, object]:
    """uvicorn's logging, plus our own loggers on stdout and the noise filter."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict = {**LOGGING_CONFIG}
    config["formatters"] = {
        **LOGGING_CONFIG["formatters"],
        "gateway": {"()": "logging.Formatter", "fmt": FORMAT},
    }
    config["filters"] = {"server_noise": {"()": ServerNoiseFilter}}
    config["handlers"] = {
        **LOGGING_CONFIG["handlers"],
        "gateway": {
            "formatter": "gateway",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
        },
    }
    upper = logging.getLevelName(_level(level))
    config["loggers"] = {
        **LOGGING_CONFIG["loggers"],
        "uvicorn.error": {
            **LOGGING_CONFIG["loggers"]["uvicorn.error"],
            "filters": ["server_noise"],
        },
        "proxy": {"handlers": ["gateway"], "level": upper, "propagate": False},
    }
    return config
