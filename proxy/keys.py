"""API keys: the key ring (SHA-256 digest → :class:`Key`) and each key's limits.

Keys come from ``VLLM_WRAPPER_API_KEY`` (comma-separated; admin keys named
``env-1``, ``env-2``... in order) and from the configuration file's ``[[keys]]``.
A key is kept only as its digest; its ``name`` is what logs, metrics and
``/usage`` show. Limits a key does not set come from ``[limits]``.

:class:`Keys` holds the current ring and limits and swaps them at run time
(:meth:`Keys.apply`, for a reload); requests in flight keep the :class:`Key`
they started with.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.configfile import FileConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
LIMIT_NAMES = ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens")


def digest(secret: str | bytes) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Per-key limits; None means no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None

    def over(self, defaults: LimitSpec) -> LimitSpec:
        """These limits, with ``defaults`` filling the ones not set."""
        return LimitSpec(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(defaults, f.name)
                for f in fields(self)
            }
        )

    @property
    def any(self) -> bool:
        return any(getattr(self, n) is not None for n in LIMIT_NAMES)

    @property
    def tokens(self) -> bool:
        """Whether any limit counts tokens (so usage must be known)."""
        return any(x is not None for x in (self.tpm, self.daily_tokens, self.monthly_tokens))

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in LIMIT_NAMES if getattr(self, n) is not None}


@dataclass(frozen=True, slots=True)
class LimitsSpec:
    """The ``[limits]`` section."""

    defaults: LimitSpec = field(default_factory=LimitSpec)
    # Tokens reserved for the answer when a request names no max_tokens.
    default_max_tokens: int = 1024
    # An in-flight slot (max_parallel) expires this long after it was taken or renewed;
    # a running request renews it every third of that.
    lease_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One ``[[keys]]`` entry (or an environment key), checked."""

    name: str
    digest: bytes = field(repr=False)
    models: tuple[str, ...] | None = None
    expires: float | None = None  # Unix time
    admin: bool = False
    metrics: bool = False
    limits: LimitSpec = field(default_factory=LimitSpec)


@dataclass(frozen=True, slots=True)
class Key:
    """A caller's key as requests see it: its spec with the default limits applied."""

    name: str
    models: frozenset[str] | None
    expires: float | None
    admin: bool
    metrics: bool
    limits: LimitSpec
    # Whether a request with this key needs the admission step (limits or a model list).
    policy: bool


def env_keys(raw: str) -> list[KeySpec]:
    """Keys from ``VLLM_WRAPPER_API_KEY``: comma-separated, admin, named env-1, env-2..."""
    secrets = [s.strip() for s in raw.split(",") if s.strip()]
    return [KeySpec(f"env-{i}", digest(s), admin=True) for i, s in enumerate(secrets, 1)]


class KeyRing:
    """digest → :class:`Key`, built once per configuration."""

    def __init__(self, specs: Iterable[KeySpec], limits: LimitsSpec) -> None:
        self.limits = limits
        self.by_digest: dict[bytes, Key] = {}
        self.by_name: dict[str, Key] = {}
        for spec in specs:
            merged = spec.limits.over(limits.defaults)
            key = Key(
                name=spec.name,
                models=frozenset(spec.models) if spec.models is not None else None,
                expires=spec.expires,
                admin=spec.admin,
                metrics=spec.metrics,
                limits=merged,
                policy=merged.any or spec.models is not None,
            )
            self.by_digest.setdefault(spec.digest, key)
            self.by_name.setdefault(spec.name, key)
        self.limited = any(k.limits.any for k in self.by_name.values())

    def __bool__(self) -> bool:
        return bool(self.by_digest)

    def find(self, token: bytes) -> Key | None:
        # A dict lookup on the token's SHA-256: timing can reveal only facts about the
        # digest, which an attacker cannot steer towards a valid key.
        return self.by_digest.get(digest(token))


class Keys:
    """The current :class:`KeyRing`; :meth:`prepare` swaps it on a reload."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    @classmethod
    def build(
        cls, env_api_key: str, file_keys: Sequence[KeySpec], limits: LimitsSpec | None
    ) -> Keys:
        return cls(KeyRing([*env_keys(env_api_key), *file_keys], limits or LimitsSpec()))

    def prepare(self, env_api_key: str, config: FileConfig) -> Callable[[], Awaitable[None]]:
        """A reload's first phase: build (and so check) the new configuration's ring; the
        returned commit swaps it in. Requests in flight keep their Key; counts already
        made stay (they are keyed by name)."""
        ring = Keys.build(env_api_key, config.keys, config.limits).ring

        async def commit() -> None:
            self.ring = ring

        return commit


__all__ = ["Key", "KeyRing", "KeySpec", "Keys", "LimitSpec", "LimitsSpec", "digest"]
