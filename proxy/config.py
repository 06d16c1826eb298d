"""Settings: the only reader of ``os.environ`` and ``.env``.

Every setting has an explicit default, is validated once at start-up, and is
passed down as one frozen object. A bad value raises :class:`ConfigError`
with a one-line message naming the variable; only the CLI turns that into an
exit.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


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
    header_timeout: float = 10.0
    send_timeout: float = 60.0
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
    config_path: str = ""
    redis_url: str = ""
    connect_timeout: float = 3.0
    # Where the settings came from (not a variable): the env file read, "" for none.
    env_file: str = ""
    playground: bool = True
    ws_max_requests: int = 8
    ws_send_timeout: float = 10.0
    ws_ping_interval: float = 20.0
    ws_auth_timeout: float = 10.0
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
        ``$VLLM_WRAPPER_ENV_FILE`` or else ``.env``; ``""`` reads no file. A file named
        explicitly (argument or variable) must exist; the default ``.env`` may be absent.
        Unknown ``VLLM_*`` variables are logged as warnings naming the nearest known one.
        """
        if environ is None:
            environ = os.environ
        named = env_file if env_file is not None else environ.get("VLLM_WRAPPER_ENV_FILE")
        values: dict[str, str] = {}
        read = ""
        path = Path(named if named is not None else ".env")
        if named or named is None:
            if path.is_file():
                try:
                    values.update(parse_env_file(path.read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"env file {str(path)!r}: cannot be read: {exc}") from None
                read = str(path)
            elif named:
                raise ConfigError(f"--env-file/VLLM_WRAPPER_ENV_FILE={named!r}: file not found")
        values.update(environ)
        for warning in unknown_variables(values):
            log.warning("%s", warning)
        return dataclasses.replace(cls.from_mapping(values), env_file=read)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        kwargs: dict[str, Any] = {}
        for var, spec in ENV_VARS.items():
            raw = values.get(var)
            if raw is None:
                continue
            value = raw.strip()
            if raw and not value and var in _NO_BLANK:
                raise ConfigError(
                    f"{var} is blank (only whitespace): set a key, or leave it empty to send none"
                    if var == "VLLM_API_KEY"
                    else f"{var} is blank (only whitespace): set a key, or unset it to turn "
                    "auth off"
                )
            try:
                kwargs[spec.field] = spec.parse(value)
            except ValueError as exc:
                raise ConfigError(f"{var}={_shown(var, raw)!r}: {exc}") from None
        return cls(**kwargs).validated()

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> Settings:
        """Check cross-field rules that hold for settings built directly, too."""
        for var, spec in ENV_VARS.items():
            value = getattr(self, spec.field)
            if isinstance(value, tuple) or value is None:
                continue
            try:
                spec.parse(str(value))
            except ValueError as exc:
                raise ConfigError(f"{var}={_shown(var, value)!r}: {exc}") from None
        if self.api_key:
            for url in self.base_urls:
                if url_has_credentials(url):
                    raise ConfigError(
                        f"VLLM_BASE_URL={redact_url(url)!r}: the URL carries credentials and "
                        "VLLM_API_KEY is set; both would claim the Authorization header, give one"
                    )
        return self

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The upstream base URLs: ``VLLM_BASE_URL`` may list several, comma-separated."""
        return tuple(u.strip() for u in self.base_url.split(",") if u.strip())

    @property
    def public_base_url(self) -> str:
        """``base_url`` without credentials or query, safe to show."""
        return ",".join(redact_url(u) for u in self.base_urls)


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


def _shown(var: str, raw: object) -> str:
    """A value for an error message: URLs without credentials, secrets not at all."""
    if var in ("VLLM_BASE_URL", "VLLM_WRAPPER_REDIS_URL"):
        return re.sub(r"//[^/@]*@", "//***@", str(raw))
    if var in ("VLLM_API_KEY", "VLLM_WRAPPER_API_KEY"):
        return "***"
    return str(raw)


def url_has_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.username or parts.password)


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{netloc}{parts.path}"


# ---- parsers: each raises ValueError with a short reason -------------------


def _urls(raw: str) -> str:
    """One base URL or several, comma-separated (replicas); each checked like :func:`check_url`."""
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        raise ValueError("expected an http:// or https:// URL")
    seen = set()
    for u in urls:
        key = check_url(u)
        if key in seen:
            raise ValueError(f"{redact_url(u)} is listed twice")
        seen.add(key)
    return ",".join(check_url(u) for u in urls)


def check_url(raw: str) -> str:
    """An http(s) base URL with a host, a valid port and no query; trailing slash dropped."""
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


def _redis_url(raw: str) -> str:
    if raw and not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return raw


def _log_level(raw: str) -> str:
    low = raw.lower()
    if low not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ValueError("expected one of critical, error, warning, info, debug, trace")
    return low


def _host(raw: str) -> str:
    if not raw or any(c.isspace() for c in raw):
        raise ValueError("expected a host name or address")
    return raw


class Var(NamedTuple):
    """One environment variable: the Settings field it sets, its parser, what it means."""

    field: str
    parse: Callable[[str], Any]
    meaning: str

    def default_text(self) -> str:
        """The default as a person would write it (``--help``, README)."""
        default = Settings.__dataclass_fields__[self.field].default
        if default is None:
            return "unset"
        if isinstance(default, bool):
            return str(default).lower()
        if isinstance(default, float) and default.is_integer():
            return str(int(default))
        return str(default) if default not in ("", ()) else "empty"


# environment variable -> Var; the one table settings are parsed from and --help lists.
ENV_VARS: dict[str, Var] = {
    "VLLM_BASE_URL": Var(
        "base_url",
        _urls,
        "upstream OpenAI-compatible base URL(s), ending in /v1, comma-separated for replicas",
    ),
    "VLLM_MODEL": Var("model", _nonempty, "default model for /chat and the model /health checks"),
    "VLLM_API_KEY": Var(
        "api_key", str, "key sent upstream as Authorization: Bearer (empty: none sent)"
    ),
    "VLLM_WRAPPER_HOST": Var("host", _host, "listen address"),
    "VLLM_WRAPPER_PORT": Var("port", _int_range(0, 65535), "listen port"),
    "VLLM_WRAPPER_API_KEY": Var("wrapper_api_key", str, "key clients must send (empty: auth OFF)"),
    "VLLM_DEFAULT_MAX_TOKENS": Var("default_max_tokens", _int_range(1), "/chat default max_tokens"),
    "VLLM_DEFAULT_TEMPERATURE": Var(
        "default_temperature", _float_range(0.0, 2.0), "/chat default temperature"
    ),
    "VLLM_MAX_RETRIES": Var("max_retries", _int_range(0, 20), "retries after the first attempt"),
    "VLLM_TIMEOUT": Var(
        "timeout",
        _float_range(0.0, open_lo=True),
        "seconds: connect and idle-read timeout to the upstream",
    ),
    "VLLM_WRAPPER_CORS_ORIGINS": Var(
        "cors_origins", _csv, "comma-separated origins allowed by CORS (empty: CORS off)"
    ),
    "VLLM_WRAPPER_MAX_BODY_BYTES": Var(
        "max_body_bytes", _int_range(1), "largest request body accepted (413 above)"
    ),
    "VLLM_WRAPPER_MAX_HEADER_BYTES": Var(
        "max_header_bytes",
        _int_range(1024),
        "largest request header block and request target (431 / 414)",
    ),
    "VLLM_WRAPPER_BODY_TIMEOUT": Var(
        "body_timeout",
        _float_range(0.0, open_lo=True),
        "seconds to receive a whole request body (408 after)",
    ),
    "VLLM_WRAPPER_HEADER_TIMEOUT": Var(
        "header_timeout",
        _float_range(0.0, open_lo=True),
        "seconds for a request head to arrive, and for a new connection's first byte (408)",
    ),
    "VLLM_WRAPPER_SEND_TIMEOUT": Var(
        "send_timeout",
        _float_range(0.0, open_lo=True),
        "seconds a client may stop reading before it is disconnected",
    ),
    "VLLM_WRAPPER_HEALTH_TIMEOUT": Var(
        "health_timeout", _float_range(0.0, open_lo=True), "seconds /health waits for the upstream"
    ),
    "VLLM_WRAPPER_RETRY_BACKOFF": Var(
        "retry_backoff",
        _float_range(0.0),
        "first backoff step, seconds (doubles each retry, full jitter)",
    ),
    "VLLM_WRAPPER_RETRY_BACKOFF_MAX": Var(
        "retry_backoff_max", _float_range(0.0), "largest backoff step, seconds"
    ),
    "VLLM_WRAPPER_RETRY_AFTER_MAX": Var(
        "retry_after_max", _float_range(0.0), "longest Retry-After honoured, seconds"
    ),
    "VLLM_WRAPPER_MAX_CONNECTIONS": Var(
        "max_connections", _int_range(1), "upstream connection pool size"
    ),
    "VLLM_WRAPPER_KEEPALIVE_EXPIRY": Var(
        "keepalive_expiry",
        _float_range(0.0),
        "seconds an idle upstream connection is kept (below vLLM's 5)",
    ),
    "VLLM_WRAPPER_LOG_LEVEL": Var("log_level", _log_level, "critical, error, warning, info, debug"),
    "VLLM_WRAPPER_ACCESS_LOG": Var("access_log", _bool, "one line per request on stdout"),
    "VLLM_WRAPPER_ALLOW_ADMIN": Var(
        "allow_admin", _bool, "relay vLLM's LoRA load/unload endpoints"
    ),
    "VLLM_WRAPPER_EXTRA_PATHS": Var(
        "extra_paths", _paths, "more /v1 paths to relay, comma-separated ('*' = one segment)"
    ),
    "VLLM_WRAPPER_PROXY_ALL": Var(
        "proxy_all", _bool, "relay every /v1 path and method (not the admin endpoints)"
    ),
    "VLLM_WRAPPER_GRACEFUL_TIMEOUT": Var(
        "graceful_timeout",
        _float_range(0.0),
        "seconds in-flight requests get to finish on shutdown",
    ),
    "VLLM_WRAPPER_DEMO": Var("demo", _bool, "run against the built-in simulated vLLM (as --demo)"),
    "VLLM_WRAPPER_DOCS": Var("docs", _bool, "serve /docs and /openapi.json (no key needed)"),
    "VLLM_WRAPPER_CONFIG": Var(
        "config_path", str, "TOML configuration file (upstreams, keys, limits...; as --config)"
    ),
    "VLLM_WRAPPER_REDIS_URL": Var(
        "redis_url", _redis_url, "Redis for shared limits and state (wins over [state] redis_url)"
    ),
    "VLLM_WRAPPER_CONNECT_TIMEOUT": Var(
        "connect_timeout",
        _float_range(0.0, open_lo=True),
        "seconds to connect to an upstream (at most VLLM_TIMEOUT)",
    ),
    "VLLM_WRAPPER_PLAYGROUND": Var("playground", _bool, "serve the /playground chat page"),
    "VLLM_WRAPPER_WS_MAX_REQUESTS": Var(
        "ws_max_requests", _int_range(1, 1000), "requests running at once on one /chat/ws socket"
    ),
    "VLLM_WRAPPER_WS_SEND_TIMEOUT": Var(
        "ws_send_timeout",
        _float_range(0.0, open_lo=True),
        "seconds a /chat/ws send may stall before the socket is closed (1008)",
    ),
    "VLLM_WRAPPER_WS_PING_INTERVAL": Var(
        "ws_ping_interval", _float_range(0.0), "seconds of silence before /chat/ws sends a ping"
    ),
    "VLLM_WRAPPER_WS_AUTH_TIMEOUT": Var(
        "ws_auth_timeout",
        _float_range(0.0, open_lo=True),
        "seconds a header-less /chat/ws socket has to send its auth message",
    ),
    "VLLM_WRAPPER_METRICS": Var("metrics", _bool, "serve Prometheus metrics at /metrics"),
    "VLLM_WRAPPER_METRICS_PUBLIC": Var(
        "metrics_public", _bool, "/metrics needs no key (wins over [metrics] public)"
    ),
    # prometheus-client's own variable: set, it puts the metrics in multiprocess mode
    "PROMETHEUS_MULTIPROC_DIR": Var(
        "metrics_dir", str, "prometheus-client's multiprocess directory (python -m proxy sets it)"
    ),
}

# Keys where only-whitespace is a mistake, not "none" (it used to turn auth off silently).
_NO_BLANK = frozenset({"VLLM_WRAPPER_API_KEY", "VLLM_API_KEY"})

# Read elsewhere, but known: the env file's name and modal_app.py's scaling knobs.
_OTHER_KNOWN = ("VLLM_WRAPPER_ENV_FILE",)
_OTHER_PREFIXES = ("VLLM_WRAPPER_MODAL_",)


def unknown_variables(values: Mapping[str, str]) -> list[str]:
    """Warnings for ``VLLM_WRAPPER_*`` names the gateway does not know, and for ``VLLM_*``
    names close to one it does (vLLM has many ``VLLM_*`` settings of its own)."""
    known = [*ENV_VARS, *_OTHER_KNOWN]
    warnings = []
    for name in sorted(values):
        if not name.startswith("VLLM_") or name in known or name.startswith(_OTHER_PREFIXES):
            continue
        # A typo is close; vLLM's own names (VLLM_RPC_TIMEOUT...) share only the prefix.
        cutoff = 0.8 if name.startswith("VLLM_WRAPPER_") else 0.9
        near = difflib.get_close_matches(name, known, n=1, cutoff=cutoff)
        if near:
            warnings.append(f"unknown setting {name} ignored: did you mean {near[0]}?")
        elif name.startswith("VLLM_WRAPPER_"):
            warnings.append(f"unknown setting {name} ignored (python -m proxy --help lists them)")
    return warnings
