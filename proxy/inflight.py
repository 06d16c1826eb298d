"""Requests in flight, so that shutdown closes the upstream pool only after they end.

Servers stop accepting, wait for open connections up to their grace period, then run
the lifespan shutdown — but some (uvicorn among them) cancel the requests left over
and start the shutdown at once, and a host app that mounts the gateway may order
things differently still. :class:`proxy.front.Front` (outermost) counts the
requests being served; the lifespan waits, up to ``VLLM_WRAPPER_GRACEFUL_TIMEOUT``,
for the count to reach zero before it closes the upstream client, so a relayed
stream is never cut by its own pool closing under it, and every request still
writes its access-log line.
"""

from __future__ import annotations

import logging

import anyio

log = logging.getLogger(__name__)


class InFlight:
    """A count of requests being served, with a wait for it to reach zero."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: anyio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for no request in flight; True if none is left."""
        if self.count == 0:
            return True
        log.info("waiting up to %gs for %d request(s) in flight", timeout, self.count)
        self._idle = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._idle.wait()
        if self.count:
            log.warning("closing the upstream client with %d request(s) in flight", self.count)
        return self.count == 0
