"""The TOML configuration file (``VLLM_WRAPPER_CONFIG`` / ``--config``) → typed, frozen specs.

The file holds the structured settings that do not fit in environment variables:
``[[upstreams]]``, ``[routing]``, ``[[keys]]``, ``[limits]``, ``[state]``,
``[history]``, ``[cache]``, ``[metrics]``. It is read with the standard
library's ``tomllib`` once, at start-up (and on reload), into a
:class:`FileConfig` that ``create_app()`` hands down.

Every problem raises :class:`ConfigFileError`, whose text is one line naming
the file, the key path and what is wrong::

    gateway.toml: keys[2].rpm: expected an integer >= 1, got "sixty"

Unknown keys are errors (a typo must not silently disable a limit). A secret
may be given inline (``api_key = "..."``) or as the name of an environment
variable (``api_key_env = "TEAM_A_KEY"``), never both.

Each section has its own parser below, reading through a :class:`Table`, which
tracks the key path, converts and checks values, and refuses keys nobody read.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from proxy.cache import CacheSpec
from proxy.config import ConfigError, check_url, redact_url, url_has_credentials
from proxy.history import HistorySpec
from proxy.keys import LIMIT_NAMES, NAME, KeySpec, LimitSpec, LimitsSpec, digest
from proxy.state import StateSpec

T = TypeVar("T")

_MISSING: Any = object()


class ConfigFileError(ConfigError):
    """A problem in the configuration file. ``str(err)`` is ``file: key.path: what``."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        self.file = file
        self.path = path
        self.problem = problem
        where = f"{file}: {path}: " if path else f"{file}: "
        super().__init__(where + problem)


def _show(value: Any) -> str:
    """A value as it looks in TOML, shortened, for an error message."""
    if isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Table:
    """One TOML table being read: typed getters that name the key path in their errors.

    Call :meth:`done` after reading every key a section knows: any key left over is
    reported as unknown (with the known ones listed).
    """

    def __init__(
        self, data: Mapping[str, Any], *, file: str, path: str, environ: Mapping[str, str]
    ) -> None:
        self.data = data
        self.file = file
        self.path = path
        self.environ = environ
        self._read: set[str] = set()

    # ---- errors and paths ----------------------------------------------------------------

    def where(self, key: str | None = None) -> str:
        if key is None:
            return self.path
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, problem: str) -> ConfigFileError:
        return ConfigFileError(self.file, self.where(key), problem)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    # ---- getters -------------------------------------------------------------------------

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._read.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.error(key, "is required")
        return default

    def str(self, key: str, default: Any = _MISSING, *, nonempty: bool = True) -> Any:
        value = self.raw(key, default)
        if value is default and key not in self.data:
            return value
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_show(value)}")
        if nonempty and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.str(key, default)
        if key in self.data and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if key in self.data and not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_show(value)}")
        return value

    def int(
        self, key: str, default: Any = _MISSING, *, lo: int | None = None, hi: int | None = None
    ) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer{_bounds(lo, hi)}, got {_show(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(key, f"expected an integer{_bounds(lo, hi)}, got {value}")
        return value

    def float(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        lo: float | None = None,
        hi: float | None = None,
        open_lo: bool = False,
    ) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(
                key, f"expected a number{_bounds(lo, hi, open_lo)}, got {_show(value)}"
            )
        bad_lo = lo is not None and (value <= lo if open_lo else value < lo)
        if bad_lo or (hi is not None and value > hi):
            raise self.error(key, f"expected a number{_bounds(lo, hi, open_lo)}, got {value}")
        return float(value)

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of strings, got {_show(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.error(f"{key}[{i}]", f"expected a non-empty string, got {_show(item)}")
        return tuple(value)

    def parsed(self, key: str, parse: Callable[[str], T], default: Any = _MISSING) -> Any:
        """A string converted by ``parse``, whose ValueError text becomes the error."""
        value = self.str(key, default)
        if key not in self.data:
            return value
        try:
            return parse(value)
        except ValueError as exc:
            raise self.error(key, f"{exc}, got {_show(value)}") from None

    def secret(self, key: str, *, required: bool = False) -> str | None:
        """``key`` inline, or ``key_env`` naming an environment variable; never both."""
        env_key = key + "_env"
        inline = self.str(key, None)
        var = self.str(env_key, None)
        if inline is not None and var is not None:
            raise self.error(None, f"give {key} or {env_key}, not both")
        if var is not None:
            value = self.environ.get(var)
            if value is None or not value.strip():
                raise self.error(env_key, f"environment variable {var} is not set or empty")
            return value.strip()
        if inline is None and required:
            raise self.error(None, f"{key} or {env_key} is required")
        return inline

    def table(self, key: str) -> Table:
        """A sub-table (an empty one when absent)."""
        value = self.raw(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table [{self.where(key)}], got {_show(value)}")
        return Table(value, file=self.file, path=self.where(key), environ=self.environ)

    def tables(self, key: str) -> list[Table]:
        """An array of tables (``[[key]]``); empty when absent."""
        value = self.raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"expected an array of tables [[{key}]], got {_show(value)}")
        return [
            Table(v, file=self.file, path=f"{self.where(key)}[{i}]", environ=self.environ)
            for i, v in enumerate(value)
        ]

    def done(self) -> None:
        """Refuse any key that no getter read (a typo must not go unnoticed)."""
        unknown = [k for k in self.data if k not in self._read]
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            raise self.error(unknown[0], f"unknown key (known here: {known})")


def _bounds(lo: float | None, hi: float | None, open_lo: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" {'>' if open_lo else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


# ---- the sections ------------------------------------------------------------------------
#
# Each section parser takes the section's Table and returns its frozen spec; it must call
# ``table.done()``. SECTIONS maps a top-level key to (FileConfig field, parser, kind) with
# kind "table" ([name]) or "array" ([[name]]). A section not listed is an unknown key.


@dataclass(frozen=True, slots=True)
class MetricsSpec:
    """``[metrics]``: ``enabled`` and ``public`` (None: not in the file)."""

    enabled: bool | None = None
    public: bool | None = None


def parse_metrics(table: Table) -> MetricsSpec:
    spec = MetricsSpec(enabled=table.bool("enabled", None), public=table.bool("public", None))
    table.done()
    return spec


@dataclass(frozen=True, slots=True)
class FileConfig:
    """Everything the configuration file says, checked. Built by :func:`load`."""

    path: str = ""
    keys: tuple[KeySpec, ...] = ()
    limits: LimitsSpec | None = None
    state: StateSpec | None = None
    upstreams: tuple[UpstreamSpec, ...] = ()
    routing: RoutingSpec | None = None
    metrics: MetricsSpec = MetricsSpec()
    cache: CacheSpec | None = None
    history: HistorySpec | None = None


SectionParser = Callable[[Any], Any]
SECTIONS: dict[str, tuple[str, SectionParser, str]] = {
    "metrics": ("metrics", parse_metrics, "table"),
}


# ---- [[upstreams]] and [routing] (issue 10) ------------------------------------------------

POLICIES = ("least-busy", "round-robin", "session", "load-aware")


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One ``[[upstreams]]`` entry (or one URL of ``VLLM_BASE_URL``).

    ``models`` empty means "discover from its ``/v1/models``"; ``api_key`` None means
    the gateway-wide ``VLLM_API_KEY``; ``max_connections`` None the gateway-wide pool size.
    """

    url: str
    api_key: str | None = None
    weight: int = 1
    models: tuple[str, ...] = ()
    max_connections: int | None = None


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    """``[routing]``: the balancing policy and the health-check knobs (README, "Many upstreams")."""

    policy: str = "least-busy"
    session_header: str = "x-session-id"
    session_user: bool = True
    probe_interval: float = 5.0
    eject_after: int = 3
    eject_backoff: float = 2.0
    eject_backoff_max: float = 60.0
    metrics_interval: float = 1.0
    metrics_stale: float = 2.0


def parse_upstreams(tables: list[Table]) -> tuple[UpstreamSpec, ...]:
    """``[[upstreams]]``: url, api_key / api_key_env, weight, models, max_connections."""
    specs: list[UpstreamSpec] = []
    seen: set[str] = set()
    for t in tables:
        url = t.parsed("url", check_url)
        api_key = t.secret("api_key")
        if api_key is not None and url_has_credentials(url):
            raise t.error(
                "url",
                f"{redact_url(url)} carries credentials and api_key is set; both would claim "
                "the Authorization header, give one",
            )
        if url in seen:
            raise t.error("url", f"{redact_url(url)} is listed twice")
        seen.add(url)
        specs.append(
            UpstreamSpec(
                url=url,
                api_key=api_key,
                weight=t.int("weight", 1, lo=1, hi=1000),
                models=t.str_list("models", ()),
                max_connections=t.int("max_connections", None, lo=1),
            )
        )
        t.done()
    return tuple(specs)


def parse_routing(t: Table) -> RoutingSpec:
    """``[routing]``: policy, session_header, session_user and the health/metrics intervals."""
    header = t.str("session_header", "x-session-id")
    if not all(c.isalnum() or c in "-_" for c in header):
        raise t.error("session_header", f"expected a header name, got {_show(header)}")
    spec = RoutingSpec(
        policy=t.choice("policy", POLICIES, "least-busy"),
        session_header=header.lower(),
        session_user=t.bool("session_user", True),
        probe_interval=t.float("probe_interval", 5.0, lo=0.1),
        eject_after=t.int("eject_after", 3, lo=1, hi=1000),
        eject_backoff=t.float("eject_backoff", 2.0, lo=0.1),
        eject_backoff_max=t.float("eject_backoff_max", 60.0, lo=0.1),
        metrics_interval=t.float("metrics_interval", 1.0, lo=0.1),
        metrics_stale=t.float("metrics_stale", 2.0, lo=0.1),
    )
    if spec.eject_backoff_max < spec.eject_backoff:
        raise t.error("eject_backoff_max", "must be >= eject_backoff")
    t.done()
    return spec


SECTIONS["upstreams"] = ("upstreams", parse_upstreams, "array")
SECTIONS["routing"] = ("routing", parse_routing, "table")


def parse(data: Mapping[str, Any], *, file: str, environ: Mapping[str, str]) -> FileConfig:
    """Check parsed TOML ``data`` and build its :class:`FileConfig`."""
    root = Table(data, file=file, path="", environ=environ)
    values: dict[str, Any] = {}
    for key, (field, parser, kind) in SECTIONS.items():
        if key not in data:
            continue
        if kind == "array":
            values[field] = parser(root.tables(key))
        else:
            values[field] = parser(root.table(key))
    root.done()
    return FileConfig(path=file, **values)


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> FileConfig:
    """Read and check the file at ``path``. Raises :class:`ConfigFileError` (one line)."""
    name = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigFileError(name, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(name, "", f"cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(name, "", f"invalid TOML: {exc}") from None
    return parse(data, file=name, environ=os.environ if environ is None else environ)


# ---- [[keys]], [limits], [state] ----------------------------------------------------------


def _limit_spec(t: Table) -> LimitSpec:
    return LimitSpec(**{name: t.int(name, None, lo=1) for name in LIMIT_NAMES})


def _expires(t: Table) -> float | None:
    value = t.raw("expires", None)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise t.error("expires", f"expected a date or date-time, got {_show(value)}") from None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(
            value.year, value.month, value.day, tzinfo=datetime.UTC
        ).timestamp()
    raise t.error("expires", f"expected a date or date-time, got {_show(value)}")


def parse_keys(tables: list[Table]) -> tuple[KeySpec, ...]:
    """``[[keys]]``: name, key / key_env / key_sha256, models, expires, admin, metrics, limits."""
    specs: list[KeySpec] = []
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for t in tables:
        name = t.str("name")
        if not NAME.fullmatch(name):
            raise t.error("name", "expected letters, digits, '_', '.', '@' or '-' (at most 64)")
        if name.startswith("env-"):
            raise t.error("name", "names env-1, env-2... are the VLLM_WRAPPER_API_KEY keys'")
        if name in names:
            raise t.error("name", f"{_show(name)} is already the name of {names[name]}")
        names[name] = t.path
        secret = t.secret("key")
        hashed = t.str("key_sha256", None)
        if (secret is None) == (hashed is None):
            raise t.error(None, "give exactly one of key, key_env, key_sha256")
        if hashed is not None:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", hashed):
                raise t.error("key_sha256", "expected 64 hex digits (sha256 of the key)")
            key_digest = bytes.fromhex(hashed)
        else:
            key_digest = digest(secret or "")
        if key_digest in digests:
            raise t.error(None, f"the same key as {digests[key_digest]}")
        digests[key_digest] = t.path
        models = t.str_list("models", None)
        if models is not None and not models:
            raise t.error("models", "must list at least one model (or be left out: any model)")
        spec = KeySpec(
            name=name,
            digest=key_digest,
            models=models,
            expires=_expires(t),
            admin=t.bool("admin", False),
            metrics=t.bool("metrics", False),
            limits=_limit_spec(t),
        )
        t.done()
        specs.append(spec)
    return tuple(specs)


def parse_limits(t: Table) -> LimitsSpec:
    """``[limits]``: default limits for every key, the estimate and the lease length."""
    spec = LimitsSpec(
        defaults=_limit_spec(t),
        default_max_tokens=t.int("default_max_tokens", 1024, lo=1),
        lease_seconds=t.float("lease_seconds", 30.0, lo=1.0, hi=3600.0),
    )
    t.done()
    return spec


_STATE = StateSpec()


def parse_state(t: Table) -> StateSpec:
    """``[state]``: backend, path, redis_url (or redis_url_env), on_error, timeout."""
    url = t.secret("redis_url")
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise t.error("redis_url", "expected a redis://, rediss:// or unix:// URL")
    backend = t.choice("backend", ("memory", "sqlite", "redis"), "")
    if backend == "redis" and url is None:
        raise t.error("backend", 'backend = "redis" needs redis_url (or VLLM_WRAPPER_REDIS_URL)')
    spec = StateSpec(
        backend=backend,
        path=t.str("path", _STATE.path),
        redis_url=url or "",
        on_error=t.choice("on_error", ("open", "closed"), "open"),
        timeout=t.float("timeout", _STATE.timeout, lo=0.01, hi=10.0),
        max_bytes=t.int("max_bytes", _STATE.max_bytes, lo=1024),
    )
    t.done()
    return spec


_CACHE = CacheSpec()


def parse_cache(t: Table) -> CacheSpec:
    """``[cache]``: enabled, shared, ttl, max_bytes, max_entry_bytes and idempotency."""
    max_bytes = t.int("max_bytes", _CACHE.max_bytes, lo=1024)
    spec = CacheSpec(
        enabled=t.bool("enabled", _CACHE.enabled),
        shared=t.bool("shared", _CACHE.shared),
        ttl=t.float("ttl", _CACHE.ttl, lo=1.0),
        max_bytes=max_bytes,
        max_entry_bytes=t.int(
            "max_entry_bytes", min(_CACHE.max_entry_bytes, max_bytes // 2), lo=1024
        ),
        idempotency=t.bool("idempotency", _CACHE.idempotency),
        idempotency_ttl=t.float("idempotency_ttl", _CACHE.idempotency_ttl, lo=1.0),
        idempotency_lease=t.float("idempotency_lease", _CACHE.idempotency_lease, lo=1.0),
    )
    if spec.max_entry_bytes > spec.max_bytes:
        raise t.error("max_entry_bytes", f"must not exceed max_bytes ({spec.max_bytes})")
    t.done()
    return spec


_HISTORY = HistorySpec()


def parse_history(t: Table) -> HistorySpec:
    """``[history]``: path (SQLite), ttl_days, max_messages, lock_seconds."""
    spec = HistorySpec(
        path=t.str("path", _HISTORY.path),
        ttl_days=t.float("ttl_days", _HISTORY.ttl_days, lo=0.0, open_lo=True, hi=3650.0),
        max_messages=t.int("max_messages", _HISTORY.max_messages, lo=2, hi=100_000),
        lock_seconds=t.float("lock_seconds", _HISTORY.lock_seconds, lo=1.0, hi=3600.0),
    )
    t.done()
    return spec


SECTIONS.update(
    {
        "keys": ("keys", parse_keys, "array"),
        "limits": ("limits", parse_limits, "table"),
        "state": ("state", parse_state, "table"),
        "cache": ("cache", parse_cache, "table"),
        "history": ("history", parse_history, "table"),
    }
)
