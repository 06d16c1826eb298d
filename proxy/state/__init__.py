"""Shared state: one small interface, three backends (SPEC §13).

Limits and quotas, conversation history, the response cache and idempotency keep
their state behind :class:`State`. The backends:

``MemoryState``  (``proxy.state.memory``)  one process; lost on restart.
``SQLiteState``  (``proxy.state.sqlite``)  one host: every ``--workers`` process
                 shares one file (WAL, ``BEGIN IMMEDIATE`` transactions); survives
                 restarts. The default.
``RedisState``   (``proxy.state.redis``)   many hosts: redis-py's asyncio client;
                 every multi-step operation is one Lua script, so it is atomic.

All three pass one contract suite (``tests/integration/test_state_contract.py``).

The interface, by the features that use it
------------------------------------------

Limits: atomic windowed counters, reservations and expiring leases.
    A request's limits are a list of :class:`Claim`, each one of three kinds:

    * ``WINDOW`` (rpm, tpm): a sliding window of ``seconds``; every request is an
      entry (its id, its time, its amount); the use is the sum of the entries newer
      than ``seconds``.
    * ``COUNTER`` (daily / monthly quotas): a plain total that lives ``seconds``
      (until its calendar window ends; the window is part of the key).
    * ``LEASE`` (max_parallel): a set of request ids, each expiring ``seconds`` after
      it was taken or last renewed; the use is the number not yet expired. A gateway
      that dies leaves nothing locked: its leases run out.

    :meth:`State.reserve` checks every claim (``used + need <= limit``) and, only if
    all fit, charges every ``amount`` — atomically, across processes and hosts.
    :meth:`State.settle` corrects the charges to the real amounts and releases the
    leases (:meth:`State.settle_soon` queues that without waiting);
    :meth:`State.renew` extends the leases of a long request;
    :meth:`State.peek` reads the use without charging (``GET /usage``).

    SQLite and Redis send the ``reserve``, ``settle`` and ``renew`` calls made while
    their previous batch runs as one batch (one transaction, one script call:
    ``proxy.state.batch``), in the order they were made; each call's outcome is what
    it would be alone at that point.

    ``reserve`` and ``settle`` are idempotent per request id (``rid``): a repeat with
    the same id returns the first outcome and charges nothing more, so a client
    library that retries a command after a timeout (redis-py does) never charges
    twice. Use a fresh id per admission, not a client-supplied one.

Response cache and idempotency: key-value with TTL and set-if-absent.
    :meth:`State.get`, :meth:`State.put` (``ttl`` seconds, ``only_if_absent`` for a
    claim-if-absent), :meth:`State.delete`. The memory backend bounds the total size
    of values (``max_bytes``, least recently used dropped first); Redis bounds by TTL
    (and its own ``maxmemory`` policy).

Conversation history: records with TTL (key-value), a per-conversation lock, and a
per-owner index newest-first with a cursor.
    :meth:`State.lock` takes (or, for the same ``owner``, extends) a lock that expires
    after ``ttl`` seconds; :meth:`State.unlock` releases it only for its owner.
    :meth:`State.index_add` puts ``member`` with ``score`` (e.g. its creation time) in
    an ordered index; the index expires ``ttl`` seconds after its last add.
    :meth:`State.index_page` lists members newest first (by score, then member,
    descending), starting strictly after a cursor ``(score, member)``: pass the last
    item of one page to get the next.

Failures
    A backend that cannot answer (Redis down or slow, an SQLite file locked past its
    timeout) raises :class:`StateUnavailable`; callers decide (``[state] on_error``).
    Nothing else escapes.

Keys are plain strings; each backend adds its own prefix. All times are seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

WINDOW = "window"
COUNTER = "counter"
LEASE = "lease"
KINDS = (WINDOW, COUNTER, LEASE)


class StateUnavailable(Exception):
    """The backend could not answer (connection refused, timeout, locked file)."""


class Claim(NamedTuple):
    """One limit of a request: check ``used + need <= limit``, then charge ``amount``.

    ``need`` defaults to ``amount``; a quota passes ``need=1`` ("something must be
    left") while charging the whole estimate. For a ``LEASE`` the amount is one slot.
    (A tuple, not a dataclass: a request builds several, and a tuple is made in a
    fraction of the time.)
    """

    key: str
    kind: str
    limit: int
    seconds: float
    amount: int = 1
    need: int | None = None

    @property
    def required(self) -> int:
        return self.amount if self.need is None else self.need


@dataclass(slots=True)
class Outcome:
    """What :meth:`State.reserve` decided.

    ``used[i]``: claim i's use after the charge (or now, when refused).
    ``reset[i]``: seconds until claim i's use next goes down (0 when nothing is held).
    ``refused``: the index of the first claim that did not fit, else None.
    ``retry_after``: seconds until the refused claim would fit (0 when admitted).
    """

    admitted: bool
    used: list[int] = field(default_factory=list)
    reset: list[float] = field(default_factory=list)
    refused: int | None = None
    retry_after: float = 0.0


class State(Protocol):
    """The shared-state interface (module docstring). All methods may raise
    :class:`StateUnavailable`."""

    name: str

    async def reserve(self, rid: str, claims: Sequence[Claim]) -> Outcome: ...

    async def settle(self, rid: str, claims: Sequence[Claim], actual: Sequence[int]) -> None:
        """Correct each claim's charge from ``claim.amount`` to ``actual[i]``; release
        leases. ``claims`` are the ones passed to :meth:`reserve`."""

    def settle_soon(
        self,
        rid: str,
        claims: Sequence[Claim],
        actual: Sequence[int],
        on_error: Callable[[StateUnavailable], None],
    ) -> None:
        """:meth:`settle` without waiting: the backend applies it with its next batch
        (memory: at once), before any later :meth:`reserve` of this handle, and calls
        ``on_error`` if it cannot (:meth:`peek` may not see it yet). :meth:`close`
        sends what is still queued."""

    async def renew(self, rid: str, claims: Sequence[Claim]) -> None:
        """Extend this request's leases by their ``seconds`` from now."""

    async def peek(self, claims: Sequence[Claim]) -> list[tuple[int, float]]:
        """``(used, reset)`` of each claim, charging nothing."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(
        self, key: str, value: bytes, ttl: float | None = None, *, only_if_absent: bool = False
    ) -> bool:
        """Store ``value``; with ``only_if_absent`` only if no live value exists.
        True when stored."""

    async def delete(self, key: str) -> bool: ...

    async def lock(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lock (or extend it when ``owner`` holds it). True when held."""

    async def unlock(self, key: str, owner: str) -> bool:
        """Release the lock if ``owner`` holds it. True when released."""

    async def index_add(self, index: str, member: str, score: float, ttl: float) -> None: ...

    async def index_remove(self, index: str, member: str) -> None: ...

    async def index_page(
        self, index: str, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[str, float]]: ...

    async def close(self) -> None: ...


def tokens_needed(entries: Sequence[tuple[float, int]], used: int, need: int, limit: int) -> float:
    """When a sliding window frees enough: the time of the entry (oldest first) whose
    expiry brings ``used + need`` under ``limit``; inf if even an empty window cannot."""
    if need > limit:
        return float("inf")
    for t, amount in entries:
        used -= amount
        if used + need <= limit:
            return t
    return entries[-1][0] if entries else 0.0


@dataclass(frozen=True, slots=True)
class StateSpec:
    """Which backend to open, from ``[state]`` and ``VLLM_WRAPPER_REDIS_URL``."""

    backend: str = ""  # memory | sqlite | redis; "" = redis when a URL is given, else sqlite
    path: str = "vllm-wrapper-state.db"
    redis_url: str = ""
    timeout: float = 0.25
    on_error: str = "open"  # open | closed
    max_bytes: int = 256 * 1024 * 1024  # memory backend's key-value bound


def open_state(spec: StateSpec) -> State:
    """Build the backend ``spec`` names (connections are opened lazily)."""
    if spec.backend == "memory":
        from proxy.state.memory import MemoryState

        return MemoryState(max_bytes=spec.max_bytes)
    if spec.backend == "redis" or (not spec.backend and spec.redis_url):
        from proxy.state.redis import RedisState

        return RedisState(spec.redis_url, timeout=spec.timeout)
    from proxy.state.sqlite import SQLiteState

    return SQLiteState(spec.path, timeout=max(spec.timeout, 1.0))


__all__ = [
    "COUNTER",
    "KINDS",
    "LEASE",
    "WINDOW",
    "Claim",
    "Outcome",
    "State",
    "StateSpec",
    "StateUnavailable",
    "open_state",
]
