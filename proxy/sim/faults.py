"""Fault switches: set through ``POST /_sim/faults`` or per request by header.

A global fault applies to the next ``count`` matching requests and is then
spent; a header applies to its own request only, so concurrent tests do not
interfere. :meth:`FaultState.take` turns both into one :class:`Faults` value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEYS = frozenset(
    {
        "fail_next",
        "status",
        "retry_after",
        "body",
        "first_byte_delay",
        "drop_after_chunks",
        "stall_after_chunks",
        "stall_seconds",
        "garbage",
        "count",
    }
)


@dataclass(slots=True)
class Faults:
    """What to do to one request."""

    fail_status: int | None = None
    retry_after: str | None = None
    fail_body: bytes | None = None
    first_byte_delay: float = 0.0
    token_delay: float | None = None
    tokens: int | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    garbage: bool = False


class FaultError(ValueError):
    """An invalid ``/_sim/faults`` body."""


def _num(spec: Mapping[str, Any], key: str, kind: type, minimum: float = 0) -> Any:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{key} must be a number")
    if value < minimum:
        raise FaultError(f"{key} must be >= {minimum}")
    return kind(value)


class FaultState:
    """The pending global faults of one simulator app."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fail_left = 0
        self.fail_status = 503
        self.retry_after: str | None = None
        self.fail_body: bytes | None = None
        self.delay_left = 0
        self.delay = 0.0
        self.drop_left = 0
        self.drop_after = 0
        self.stall_left = 0
        self.stall_after = 0
        self.stall_seconds = 0.0
        self.garbage_left = 0

    def configure(self, spec: Mapping[str, Any]) -> None:
        """Apply a ``/_sim/faults`` body; each fault named replaces the pending one."""
        unknown = set(spec) - KEYS
        if unknown:
            raise FaultError(f"unknown fault keys: {sorted(unknown)}")
        count = _num(spec, "count", int, 1) if "count" in spec else 1
        if "fail_next" in spec:
            self.fail_left = _num(spec, "fail_next", int)
            self.fail_status = _num(spec, "status", int, 100) if "status" in spec else 503
            ra = spec.get("retry_after")
            self.retry_after = None if ra is None else str(ra)
            body = spec.get("body")
            if body is not None and not isinstance(body, str):
                raise FaultError("body must be a string")
            self.fail_body = None if body is None else body.encode()
        if "first_byte_delay" in spec:
            self.delay = _num(spec, "first_byte_delay", float)
            self.delay_left = count
        if "drop_after_chunks" in spec:
            self.drop_after = _num(spec, "drop_after_chunks", int)
            self.drop_left = count
        if "stall_after_chunks" in spec:
            self.stall_after = _num(spec, "stall_after_chunks", int)
            self.stall_seconds = (
                _num(spec, "stall_seconds", float) if "stall_seconds" in spec else 30.0
            )
            self.stall_left = count
        if "garbage" in spec:
            self.garbage_left = count if spec["garbage"] else 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "fail_next": self.fail_left,
            "status": self.fail_status,
            "retry_after": self.retry_after,
            "body": None if self.fail_body is None else self.fail_body.decode(),
            "first_byte_delay": {"seconds": self.delay, "count": self.delay_left},
            "drop_after_chunks": {"chunks": self.drop_after, "count": self.drop_left},
            "stall_after_chunks": {
                "chunks": self.stall_after,
                "seconds": self.stall_seconds,
                "count": self.stall_left,
            },
            "garbage": {"count": self.garbage_left},
        }

    def take(self, headers: Mapping[bytes, bytes], *, counted: bool = True) -> Faults:
        """Faults for a new ``/v1/*`` request: its headers first, then the global ones.
        ``counted=False`` (a gateway's own poll of ``/v1/models``, sent with its
        ``user-agent``): only its headers' faults, so a test's "fail the next N" or
        "delay the next N" is not taken by a poll that happened to come in between."""
        f = Faults()
        if not counted:
            if headers:
                _from_headers(f, headers)
            return f
        if self.fail_left > 0:
            self.fail_left -= 1
            f.fail_status, f.retry_after, f.fail_body = (
                self.fail_status,
                self.retry_after,
                self.fail_body,
            )
        if self.delay_left > 0:
            self.delay_left -= 1
            f.first_byte_delay = self.delay
        if headers:
            _from_headers(f, headers)
        return f

    def take_generation(self, f: Faults, stream: bool) -> None:
        """The faults that only make sense on a generation (streamed or not)."""
        if self.garbage_left > 0:
            self.garbage_left -= 1
            f.garbage = True
        if not stream:
            return
        if f.drop_after is None and self.drop_left > 0:
            self.drop_left -= 1
            f.drop_after = self.drop_after
        if f.stall_after is None and self.stall_left > 0:
            self.stall_left -= 1
            f.stall_after, f.stall_seconds = self.stall_after, self.stall_seconds


def _float(value: bytes) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if x >= 0 else None


def _int(value: bytes) -> int | None:
    try:
        x = int(value)
    except ValueError:
        return None
    return x if x >= 0 else None


def _from_headers(f: Faults, headers: Mapping[bytes, bytes]) -> None:
    if (v := headers.get(b"x-sim-fail-status")) is not None and (s := _int(v)):
        f.fail_status = s
        ra = headers.get(b"x-sim-retry-after")
        f.retry_after = None if ra is None else ra.decode("latin-1")
        f.fail_body = None
    if (v := headers.get(b"x-sim-first-byte-delay")) is not None:
        f.first_byte_delay = _float(v) or 0.0
    if (v := headers.get(b"x-sim-token-delay")) is not None:
        f.token_delay = _float(v)
    if (v := headers.get(b"x-sim-tokens")) is not None:
        f.tokens = _int(v) or None
    if (v := headers.get(b"x-sim-drop-after")) is not None:
        f.drop_after = _int(v)
    if (v := headers.get(b"x-sim-stall-after")) is not None:
        f.stall_after = _int(v)
        f.stall_seconds = _float(headers.get(b"x-sim-stall-seconds", b"30")) or 0.0
