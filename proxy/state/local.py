"""The limit algorithm for the backends that run it in Python (memory, SQLite).

:class:`LocalLimits` implements :meth:`State.reserve` / ``settle`` / ``renew`` /
``peek`` once, over a handful of storage primitives that each backend provides;
the backend makes every call of these methods one atomic unit (the memory
backend runs it without awaiting; SQLite inside one ``BEGIN IMMEDIATE``
transaction). Redis runs the same algorithm as Lua (``proxy.state.redis``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.state import COUNTER, LEASE, WINDOW, Claim, Outcome, tokens_needed
from proxy.state.batch import RESERVE, SETTLE, Op

# How long a request id's outcome is remembered (a retried command within this time
# sees the first outcome).
MARK_SECONDS = 30.0


class LocalLimits:
    """Storage primitives (abstract) + the reserve/settle algorithm on top."""

    # ---- primitives ---------------------------------------------------------------------

    def mark_get(self, name: str, now: float) -> Any:
        """The value ``mark_set`` stored (a reservation's :class:`Outcome`, or True for
        a settlement), None once expired. Each backend stores it as it can."""
        raise NotImplementedError

    def mark_set(self, name: str, value: Any, expires: float) -> None:
        raise NotImplementedError

    def win_use(self, key: str, since: float) -> tuple[int, float | None]:
        """Drop entries not newer than ``since``; the sum of the rest and the oldest time.
        Kept as a running sum, so this costs O(entries dropped), not O(window)."""
        raise NotImplementedError

    def win_entries(self, key: str) -> list[tuple[float, int]]:
        """The window's entries as (time, amount), oldest first (only when refusing)."""
        raise NotImplementedError

    def win_add(self, key: str, member: str, t: float, amount: int, expires: float) -> None:
        raise NotImplementedError

    def win_set(self, key: str, member: str, amount: int) -> None:
        """Change an entry's amount (nothing if it is gone)."""
        raise NotImplementedError

    def ctr_get(self, key: str, now: float) -> int:
        raise NotImplementedError

    def ctr_add(self, key: str, delta: int, expires: float, now: float, *, create: bool) -> None:
        raise NotImplementedError

    def lease_use(self, key: str, now: float, rid: str) -> tuple[int, float | None]:
        """Drop expired leases; the number of the others not held by ``rid`` and the
        earliest expiry (None when there are none)."""
        raise NotImplementedError

    def lease_held(self, key: str, now: float, rid: str) -> bool:
        """Whether ``rid`` holds an unexpired lease."""
        raise NotImplementedError

    def lease_set(self, key: str, member: str, expires: float) -> None:
        raise NotImplementedError

    def lease_del(self, key: str, member: str) -> None:
        raise NotImplementedError

    # ---- the algorithm ------------------------------------------------------------------

    def _use(self, claim: Claim, now: float, rid: str) -> tuple[int, float, float]:
        """(used, reset seconds, retry-after seconds for ``claim.required`` more)."""
        if claim.kind == WINDOW:
            used, oldest = self.win_use(claim.key, now - claim.seconds)
            reset = oldest + claim.seconds - now if oldest is not None else 0.0
            retry = 0.0
            if used + claim.required > claim.limit:
                entries = self.win_entries(claim.key)
                when = tokens_needed(entries, used, claim.required, claim.limit)
                retry = max(when + claim.seconds - now, 0.0)
            return used, max(reset, 0.0), retry
        if claim.kind == COUNTER:
            return self.ctr_get(claim.key, now), claim.seconds, claim.seconds
        used, first = self.lease_use(claim.key, now, rid)
        wait = 0.0 if first is None else first - now
        return used, wait, max(wait, 0.0)

    def reserve_now(self, rid: str, claims: Sequence[Claim], now: float) -> Outcome:
        mark = "r:" + rid
        seen = self.mark_get(mark, now)
        if seen is not None:
            return seen
        outcome = Outcome(True)
        for i, claim in enumerate(claims):
            used, reset, retry = self._use(claim, now, rid)
            if outcome.admitted and used + claim.required > claim.limit:
                outcome.admitted = False
                outcome.refused = i
                outcome.retry_after = retry
            outcome.used.append(used)
            outcome.reset.append(reset)
        if outcome.admitted:
            for i, claim in enumerate(claims):
                if claim.kind == WINDOW:
                    self.win_add(claim.key, rid, now, claim.amount, now + claim.seconds)
                    if outcome.reset[i] == 0.0:
                        outcome.reset[i] = claim.seconds
                elif claim.kind == COUNTER:
                    self.ctr_add(claim.key, claim.amount, now + claim.seconds, now, create=True)
                else:
                    self.lease_set(claim.key, rid, now + claim.seconds)
                    if outcome.reset[i] <= 0.0:
                        outcome.reset[i] = claim.seconds
                outcome.used[i] += claim.amount
        self.mark_set(mark, outcome, now + MARK_SECONDS)
        return outcome

    def settle_now(
        self, rid: str, claims: Sequence[Claim], actual: Sequence[int], now: float
    ) -> None:
        mark = "s:" + rid
        if self.mark_get(mark, now) is not None:
            return
        self.mark_set(mark, True, now + MARK_SECONDS)
        for claim, amount in zip(claims, actual, strict=True):
            if claim.kind == WINDOW:
                self.win_set(claim.key, rid, amount)
            elif claim.kind == COUNTER:
                if amount != claim.amount:
                    self.ctr_add(claim.key, amount - claim.amount, 0.0, now, create=False)
            else:
                self.lease_del(claim.key, rid)

    def renew_now(self, rid: str, claims: Sequence[Claim], now: float) -> None:
        for claim in claims:
            if claim.kind == LEASE and self.lease_held(claim.key, now, rid):
                self.lease_set(claim.key, rid, now + claim.seconds)

    def run_now(self, batch: Sequence[Op], now: float) -> list[Any]:
        """A batch of calls (``proxy.state.batch``), in order; an Outcome per reservation."""
        out: list[Any] = []
        for op in batch:
            if op.kind == RESERVE:
                out.append(self.reserve_now(op.rid, op.claims, now))
            elif op.kind == SETTLE:
                assert op.actual is not None
                out.append(self.settle_now(op.rid, op.claims, op.actual, now))
            else:
                out.append(self.renew_now(op.rid, op.claims, now))
        return out

    def peek_now(self, claims: Sequence[Claim], now: float) -> list[tuple[int, float]]:
        out = []
        for claim in claims:
            used, reset, _ = self._use(claim, now, "")
            out.append((used, reset))
        return out
