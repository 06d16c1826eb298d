"""Settings: the only reader of ``os.environ`` and ``.env``.

Every setting has an explicit default, is validated once at start-up, and is
passed down as one frozen object. A bad value raises :class:`ConfigError`
with a one-line message naming the variable; only the CLI turns that into an
exit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting has an invalid value. ``str(err)`` is one line naming the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    """All gateway settings. Build with :meth:`from_env` or directly (tests, embedding)."""

    # SPEC §2, the user's guide table
    base_url: str = "http://localhost:8000/v1"
    model: str = "meta-llama/Llama-3.1-70B-Instruct"
    api_key: str = ""
    host: str = "0.0.0.0"
    port: int = 8001
    wrapper_api_key: str = ""
    default_max_tokens: int = 2048
    default_temperature: float = 0.7
    max_retries: int = 3
    timeout: float = 60.0
    # VLLM_WRAPPER_* additions (README lists them)
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    body_timeout: float = 30.0
    health_timeout: float = 2.0
    retry_backoff: float = 0.25
    retry_backoff_max: float = 4.0
    retry_after_max: float = 30.0
    max_connections: int = 1000
    keepalive_expiry: float = 4.0
    log_level: str = "info"
    access_log: bool = True
    allow_admin: bool = False
    extra_paths: tuple[str, ...] = ()
    proxy_all: bool = False
    graceful_timeout: float = 30.0
    demo: bool = False
    docs: bool = True
    # metrics (proxy/metrics.py); None: not set here, so the config file's [metrics] or the default
    metrics: bool | None = None
    metrics_public: bool | None = None
    metrics_dir: str = ""

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = None,
    ) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``) over an optional ``.env``.

        The real environment wins over the file. ``env_file`` defaults to
        ``$VLLM_WRAPPER_ENV_FILE`` or else ``.env``; ``""`` reads no file.
        """
        if environ is None:
            environ = os.environ
        if env_file is None:
            env_file = environ.get("VLLM_WRAPPER_ENV_FILE", ".env")
        values: dict[str, str] = {}
        if env_file:
            path = Path(env_file)
            if path.is_file():
                values.update(parse_env_file(path.read_text(encoding="utf-8")))
        values.update(environ)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        kwargs: dict[str, Any] = {}
        for var, (name, parse) in ENV_VARS.items():
            raw = values.get(var)
            if raw is None:
                continue
            try:
                kwargs[name] = parse(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{var}={raw!r}: {exc}") from None
        return cls(**kwargs).validated()

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> Settings:
        """Check cross-field rules that hold for settings built directly, too."""
        for var, (name, parse) in ENV_VARS.items():
            value = getattr(self, name)
            if isinstance(value, tuple) or value is None:
                continue
            try:
                parse(str(value))
            except ValueError as exc:
                raise ConfigError(f"{var}={value!r}: {exc}") from None
        return self

    @property
    def public_base_url(self) -> str:
        """``base_url`` without credentials or query, safe to show."""
        return redact_url(self.base_url)


def parse_env_file(text: str) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines: ``#`` comments, ``export``, quotes, inline `` # comments``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            value = value[1:end] if end > 0 else value[1:]
        else:
            hash_at = value.find(" #")
            if hash_at < 0:
                hash_at = value.find("\t#")
            if hash_at >= 0:
                value = value[:hash_at].rstrip()
        out[key] = value
    return out


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{netloc}{parts.path}"


# ---- parsers: each raises ValueError with a short reason -------------------


def _url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError("expected an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("URL has no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("URL has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError("URL must not have a query or fragment")
    return raw.rstrip("/")


def _nonempty(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"expected an integer {bound}")
        return value

    return parse


def _float_range(
    lo: float, hi: float | None = None, *, open_lo: bool = False
) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        if (value <= lo if open_lo else value < lo) or (hi is not None and value > hi):
            bound = f"in {lo}..{hi}" if hi is not None else (f"> {lo}" if open_lo else f">= {lo}")
            raise ValueError(f"expected a number {bound}")
        return value

    return parse


def _bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _paths(raw: str) -> tuple[str, ...]:
    paths = _csv(raw)
    for p in paths:
        if not p.startswith("/") or any(s in (".", "..") for s in p.split("/")):
            raise ValueError(f"expected paths under /v1 starting with '/', got {p!r}")
    return paths


def _log_level(raw: str) -> str:
    low = raw.lower()
    if low not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ValueError("expected one of critical, error, warning, info, debug, trace")
    return low


def _host(raw: str) -> str:
    if not raw or any(c.isspace() for c in raw):
        raise ValueError("expected a host name or address")
    return raw


# environment variable -> (Settings field, parser)
ENV_VARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "VLLM_BASE_URL": ("base_url", _url),
    "VLLM_MODEL": ("model", _nonempty),
    "VLLM_API_KEY": ("api_key", str),
    "VLLM_WRAPPER_HOST": ("host", _host),
    "VLLM_WRAPPER_PORT": ("port", _int_range(0, 65535)),
    "VLLM_WRAPPER_API_KEY": ("wrapper_api_key", str),
    "VLLM_DEFAULT_MAX_TOKENS": ("default_max_tokens", _int_range(1)),
    "VLLM_DEFAULT_TEMPERATURE": ("default_temperature", _float_range(0.0, 2.0)),
    "VLLM_MAX_RETRIES": ("max_retries", _int_range(0, 20)),
    "VLLM_TIMEOUT": ("timeout", _float_range(0.0, open_lo=True)),
    "VLLM_WRAPPER_CORS_ORIGINS": ("cors_origins", _csv),
    "VLLM_WRAPPER_MAX_BODY_BYTES": ("max_body_bytes", _int_range(1)),
    "VLLM_WRAPPER_MAX_HEADER_BYTES": ("max_header_bytes", _int_range(1024)),
    "VLLM_WRAPPER_BODY_TIMEOUT": ("body_timeout", _float_range(0.0, open_lo=True)),
    "VLLM_WRAPPER_HEALTH_TIMEOUT": ("health_timeout", _float_range(0.0, open_lo=True)),
    "VLLM_WRAPPER_RETRY_BACKOFF": ("retry_backoff", _float_range(0.0)),
    "VLLM_WRAPPER_RETRY_BACKOFF_MAX": ("retry_backoff_max", _float_range(0.0)),
    "VLLM_WRAPPER_RETRY_AFTER_MAX": ("retry_after_max", _float_range(0.0)),
    "VLLM_WRAPPER_MAX_CONNECTIONS": ("max_connections", _int_range(1)),
    "VLLM_WRAPPER_KEEPALIVE_EXPIRY": ("keepalive_expiry", _float_range(0.0)),
    "VLLM_WRAPPER_LOG_LEVEL": ("log_level", _log_level),
    "VLLM_WRAPPER_ACCESS_LOG": ("access_log", _bool),
    "VLLM_WRAPPER_ALLOW_ADMIN": ("allow_admin", _bool),
    "VLLM_WRAPPER_EXTRA_PATHS": ("extra_paths", _paths),
    "VLLM_WRAPPER_PROXY_ALL": ("proxy_all", _bool),
    "VLLM_WRAPPER_GRACEFUL_TIMEOUT": ("graceful_timeout", _float_range(0.0)),
    "VLLM_WRAPPER_DEMO": ("demo", _bool),
    "VLLM_WRAPPER_DOCS": ("docs", _bool),
    "VLLM_WRAPPER_METRICS": ("metrics", _bool),
    "VLLM_WRAPPER_METRICS_PUBLIC": ("metrics_public", _bool),
    # prometheus-client's own variable: set, it puts the metrics in multiprocess mode
    "PROMETHEUS_MULTIPROC_DIR": ("metrics_dir", str),
}
