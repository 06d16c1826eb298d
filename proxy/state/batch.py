"""Batching of the limit calls for the backends that pay per call (SQLite, Redis).

Every ``reserve``, ``settle`` and ``renew`` made while the previous batch runs (or
in the same event-loop iteration, when none runs) goes to the backend as one batch:
one transaction on SQLite, one script call on Redis, applied in the order the calls
were made. A settlement nobody waits for lingers a few milliseconds for the next
reservation to take it along (at low rates, one batch per request instead of
two); a call someone waits for (a reservation) goes out at once.
``depth`` batches run at a time (1 for Redis; 2 for SQLite, whose one
worker thread runs them in order), so a settlement queued before a reservation is
always applied before it. Under load a batch carries many requests' calls; alone, a
request's call goes out at once (one loop iteration later).

A settlement nobody waits for (:meth:`Batcher.settle_soon`) costs the request a
list append: no task, no round trip of its own. The queue is bounded; when it is
full (the backend down for long), new settlements are dropped and reported as
failures, like a failed call (leases then expire by themselves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from proxy.state import LEASE, Claim, Outcome, StateUnavailable

RESERVE, SETTLE, RENEW = "r", "s", "n"

OnError = Callable[[StateUnavailable], None]


class Op:
    """One queued call: ``kind`` (RESERVE, SETTLE, RENEW), its request id and claims;
    ``actual`` for a settlement; ``future`` for a caller waiting on it."""

    __slots__ = ("actual", "claims", "future", "kind", "on_error", "rid")

    def __init__(
        self,
        kind: str,
        rid: str,
        claims: Sequence[Claim],
        actual: Sequence[int] | None = None,
        future: asyncio.Future[Any] | None = None,
        on_error: OnError | None = None,
    ) -> None:
        self.kind = kind
        self.rid = rid
        self.claims = claims
        self.actual = actual
        self.future = future
        self.on_error = on_error


# run(batch) -> one result per op (an Outcome for a reservation); raises StateUnavailable.
Runner = Callable[[list[Op]], Awaitable[list[Any]]]


class Batcher:
    """Queues limit calls and runs them through ``run`` a batch at a time."""

    def __init__(
        self,
        run: Runner,
        *,
        depth: int = 1,
        linger: float = 0.005,
        batch: int = 256,
        queued: int = 10_000,
    ) -> None:
        self._run = run
        self.depth = depth
        self.linger = linger
        self.batch = batch
        self.queued = queued
        self._ops: list[Op] = []
        self._running: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._lingering: asyncio.TimerHandle | None = None

    # ---- the State methods --------------------------------------------------------------

    async def reserve(self, rid: str, claims: Sequence[Claim]) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._submit(Op(RESERVE, rid, claims, future=future))
        return await future

    async def settle(self, rid: str, claims: Sequence[Claim], actual: Sequence[int]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submit(Op(SETTLE, rid, claims, actual, future=future))
        await future

    def settle_soon(
        self, rid: str, claims: Sequence[Claim], actual: Sequence[int], on_error: OnError
    ) -> None:
        self._submit(Op(SETTLE, rid, claims, actual, on_error=on_error), urgent=False)

    async def renew(self, rid: str, claims: Sequence[Claim]) -> None:
        leases = [c for c in claims if c.kind == LEASE]
        if leases:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._submit(Op(RENEW, rid, leases, future=future))
            await future

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every queued call has run."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._ops or self._running) and loop.time() < deadline:
            if self._lingering is not None:
                self._start()
            if self._running:
                await asyncio.wait(list(self._running), timeout=deadline - loop.time())
            else:
                await asyncio.sleep(0.001)  # a batch is about to start

    # ---- the queue ----------------------------------------------------------------------

    def _submit(self, op: Op, *, urgent: bool = True) -> None:
        """Queue ``op``. An urgent call (someone waits for it) starts a batch in this
        loop iteration's wake; a settlement nobody waits for lingers up to ``linger``
        seconds for company (the next reservation takes it along)."""
        if len(self._ops) >= self.queued:
            _fail(op, StateUnavailable(f"more than {self.queued} state calls queued"))
            return
        self._ops.append(op)
        if self._scheduled or len(self._running) >= self.depth:
            return  # a batch starts soon, or when the running one ends
        if urgent:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)
        elif self._lingering is None:
            self._lingering = asyncio.get_running_loop().call_later(self.linger, self._start)

    def _start(self) -> None:
        self._scheduled = False
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if len(self._running) >= self.depth or not self._ops:
            return
        batch = self._ops[: self.batch]
        del self._ops[: self.batch]
        task = asyncio.ensure_future(self._go(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _go(self, batch: list[Op]) -> None:
        results: list[Any] | None = None
        error = StateUnavailable("the state call was interrupted")
        try:
            results = await self._run(batch)
        except StateUnavailable as exc:
            error = exc
        finally:
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._deliver(batch, results, error)
            if self._ops and not self._scheduled:
                self._start()

    def _deliver(self, batch: list[Op], results: list[Any] | None, error: StateUnavailable):
        if results is None:
            for op in batch:
                _fail(op, error)
            return
        for op, result in zip(batch, results, strict=True):
            future = op.future
            if future is None:
                continue
            if not future.cancelled():
                future.set_result(result)
            elif op.kind == RESERVE and result.admitted:
                # The caller is gone (cancelled while waiting): free its slot, keep the
                # charges (the request may have reached nobody, but it was counted).
                self._submit(Op(SETTLE, op.rid, op.claims, [c.amount for c in op.claims]))


def _fail(op: Op, error: StateUnavailable) -> None:
    if op.future is not None:
        if not op.future.done():
            op.future.set_exception(error)
    elif op.on_error is not None:
        op.on_error(error)
