"""In-process state: exact for one process, lost on restart."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from proxy.state import Claim, Outcome
from proxy.state.batch import OnError
from proxy.state.local import LocalLimits


class _Window:
    """A sliding window's entries (member -> [time, amount], oldest first) and their sum."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: dict[str, list[float]] = {}
        self.total = 0.0


class MemoryState(LocalLimits):
    """Dicts in this process. Every method runs without awaiting, so it is atomic on the
    event loop. Key-value entries are bounded by ``max_bytes`` (least recently used go)."""

    name = "memory"

    def __init__(self, *, max_bytes: int = 256 * 1024 * 1024, clock=time.time) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self._marks: dict[str, tuple[bytes, float]] = {}
        self._windows: dict[str, _Window] = {}
        self._counters: dict[str, list[float]] = {}  # key -> [value, expires]
        self._leases: dict[str, dict[str, float]] = {}
        self._kv: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._kv_bytes = 0
        self._locks: dict[str, tuple[str, float]] = {}
        self._indexes: dict[str, tuple[dict[str, float], float]] = {}
        self._ops = 0

    # ---- limit primitives ---------------------------------------------------------------

    def mark_get(self, name: str, now: float) -> Any:
        hit = self._marks.get(name)
        if hit is None or hit[1] <= now:
            return None
        return hit[0]

    def mark_set(self, name: str, value: Any, expires: float) -> None:
        self._marks[name] = (value, expires)
        self._ops += 1
        if self._ops % 1024 == 0:
            self._sweep()

    def _sweep(self) -> None:
        now = self.clock()
        # Marks all live MARK_SECONDS: insertion order is expiry order.
        marks = self._marks
        while marks:
            name = next(iter(marks))
            if marks[name][1] > now:
                break
            del marks[name]
        for k in [k for k, v in self._counters.items() if v[1] <= now]:
            del self._counters[k]
        for name in [k for k, (_, exp) in self._indexes.items() if exp <= now]:
            del self._indexes[name]

    def win_use(self, key: str, since: float) -> tuple[int, float | None]:
        window = self._windows.get(key)
        if window is None:
            return 0, None
        entries = window.entries
        # Insertion order is time order (one process, one clock): drop from the front.
        while entries:
            member = next(iter(entries))
            t, amount = entries[member]
            if t > since:
                break
            del entries[member]
            window.total -= amount
        if not entries:
            del self._windows[key]
            return 0, None
        return int(window.total), entries[next(iter(entries))][0]

    def win_entries(self, key: str) -> list[tuple[float, int]]:
        window = self._windows.get(key)
        return [] if window is None else [(t, int(a)) for t, a in window.entries.values()]

    def win_add(self, key: str, member: str, t: float, amount: int, expires: float) -> None:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        old = window.entries.pop(member, None)
        if old is not None:
            window.total -= old[1]
        window.entries[member] = [t, amount]
        window.total += amount

    def win_set(self, key: str, member: str, amount: int) -> None:
        window = self._windows.get(key)
        entry = None if window is None else window.entries.get(member)
        if window is not None and entry is not None:
            window.total += amount - entry[1]
            entry[1] = amount

    def ctr_get(self, key: str, now: float) -> int:
        hit = self._counters.get(key)
        return 0 if hit is None or hit[1] <= now else int(hit[0])

    def ctr_add(self, key: str, delta: int, expires: float, now: float, *, create: bool) -> None:
        hit = self._counters.get(key)
        if hit is None or hit[1] <= now:
            if create:
                self._counters[key] = [delta, expires]
            return
        hit[0] += delta

    def lease_use(self, key: str, now: float, rid: str) -> tuple[int, float | None]:
        leases = self._leases.get(key)
        if not leases:
            return 0, None
        # Kept in expiry order (lease_set re-inserts): drop from the front.
        while leases:
            member = next(iter(leases))
            if leases[member] > now:
                break
            del leases[member]
        if not leases:
            return 0, None
        return len(leases) - (rid in leases), leases[next(iter(leases))]

    def lease_held(self, key: str, now: float, rid: str) -> bool:
        expires = self._leases.get(key, {}).get(rid)
        return expires is not None and expires > now

    def lease_set(self, key: str, member: str, expires: float) -> None:
        leases = self._leases.setdefault(key, {})
        leases.pop(member, None)
        # Expiry order holds while a key's leases all last as long (one lease_seconds);
        # a shorter one (after a reload) is sorted in.
        later = bool(leases) and next(reversed(leases.values())) > expires
        leases[member] = expires
        if later:
            self._leases[key] = dict(sorted(leases.items(), key=lambda kv: kv[1]))

    def lease_del(self, key: str, member: str) -> None:
        self._leases.get(key, {}).pop(member, None)

    # ---- State --------------------------------------------------------------------------

    async def reserve(self, rid: str, claims: Sequence[Claim]) -> Outcome:
        return self.reserve_now(rid, claims, self.clock())

    async def settle(self, rid: str, claims: Sequence[Claim], actual: Sequence[int]) -> None:
        self.settle_now(rid, claims, actual, self.clock())

    def settle_soon(
        self, rid: str, claims: Sequence[Claim], actual: Sequence[int], on_error: OnError
    ) -> None:
        self.settle_now(rid, claims, actual, self.clock())

    async def renew(self, rid: str, claims: Sequence[Claim]) -> None:
        self.renew_now(rid, claims, self.clock())

    async def peek(self, claims: Sequence[Claim]) -> list[tuple[int, float]]:
        return self.peek_now(claims, self.clock())

    async def get(self, key: str) -> bytes | None:
        hit = self._kv.get(key)
        if hit is None:
            return None
        if hit[1] <= self.clock():
            self._kv_drop(key)
            return None
        self._kv.move_to_end(key)
        return hit[0]

    def _kv_drop(self, key: str) -> bool:
        hit = self._kv.pop(key, None)
        if hit is None:
            return False
        self._kv_bytes -= len(hit[0])
        return True

    async def put(
        self, key: str, value: bytes, ttl: float | None = None, *, only_if_absent: bool = False
    ) -> bool:
        now = self.clock()
        if only_if_absent and await self.get(key) is not None:
            return False
        if len(value) > self.max_bytes:
            return False
        self._kv_drop(key)
        self._kv[key] = (value, now + ttl if ttl is not None else float("inf"))
        self._kv_bytes += len(value)
        while self._kv_bytes > self.max_bytes:
            oldest = next(iter(self._kv))
            self._kv_drop(oldest)
        return True

    async def delete(self, key: str) -> bool:
        live = await self.get(key) is not None
        self._kv_drop(key)
        return live

    async def lock(self, key: str, owner: str, ttl: float) -> bool:
        now = self.clock()
        held = self._locks.get(key)
        if held is not None and held[1] > now and held[0] != owner:
            return False
        self._locks[key] = (owner, now + ttl)
        return True

    async def unlock(self, key: str, owner: str) -> bool:
        held = self._locks.get(key)
        if held is None or held[0] != owner or held[1] <= self.clock():
            return False
        del self._locks[key]
        return True

    def _index(self, index: str) -> dict[str, float]:
        hit = self._indexes.get(index)
        if hit is None or hit[1] <= self.clock():
            self._indexes.pop(index, None)
            return {}
        return hit[0]

    async def index_add(self, index: str, member: str, score: float, ttl: float) -> None:
        members = self._index(index)
        members[member] = score
        self._indexes[index] = (members, self.clock() + ttl)

    async def index_remove(self, index: str, member: str) -> None:
        self._index(index).pop(member, None)

    async def index_page(
        self, index: str, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[str, float]]:
        items = sorted(((s, m) for m, s in self._index(index).items()), reverse=True)
        if after is not None:
            items = [it for it in items if it < after]
        return [(m, s) for s, m in items[:limit]]

    async def close(self) -> None:
        return None
