"""``Relay.guard``: a client disconnect cancels the exchange; any other cancellation propagates."""

from __future__ import annotations

import asyncio

import pytest

from proxy.accesslog import RequestInfo
from proxy.config import Settings
from proxy.passthrough import Relay
from proxy.retry import RetryPolicy
from proxy.upstream import Upstream


def make_relay() -> Relay:
    settings = Settings()
    return Relay(Upstream(settings), RetryPolicy(), settings)


class Client:
    """An ASGI ``receive`` that answers ``http.disconnect`` once ``leave()`` is called."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    def leave(self) -> None:
        self.gone.set()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def hang(started: asyncio.Event, cancelled: list[bool]) -> bool:
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        cancelled.append(True)
        raise
    return True


def test_a_disconnect_cancels_the_exchange_and_is_absorbed() -> None:
    async def main() -> None:
        client, info = Client(), RequestInfo(b"id")
        started, cancelled = asyncio.Event(), []
        task = asyncio.ensure_future(
            make_relay().guard({}, client.receive, info, lambda: hang(started, cancelled))
        )
        await started.wait()
        client.leave()
        await asyncio.wait_for(task, 5)  # returns normally
        assert cancelled == [True]
        assert info.note == "client-disconnected"
        assert task.cancelling() == 0

    asyncio.run(main())


@pytest.mark.parametrize("also_disconnect", [False, True])
def test_cancellation_from_outside_propagates(also_disconnect: bool) -> None:
    async def main() -> None:
        client, info = Client(), RequestInfo(b"id")
        started, cancelled = asyncio.Event(), []
        task = asyncio.ensure_future(
            make_relay().guard({}, client.receive, info, lambda: hang(started, cancelled))
        )
        await started.wait()
        if also_disconnect:
            client.leave()
            await asyncio.sleep(0)  # the watcher sees the disconnect and cancels first
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert cancelled == [True]

    asyncio.run(main())


def test_a_disconnect_as_the_exchange_ends_does_not_cancel_the_task_later() -> None:
    async def main() -> None:
        client, info = Client(), RequestInfo(b"id")

        async def finish() -> bool:
            # uvicorn answers receive() with http.disconnect once the response is complete;
            # the watcher's callback then runs just after the exchange returns.
            client.leave()
            await asyncio.sleep(0)
            return True

        async def request() -> str:
            await make_relay().guard({}, client.receive, info, finish)
            await asyncio.sleep(0.05)  # a stray cancellation would land here
            return "done"

        assert await asyncio.wait_for(request(), 5) == "done"
        assert info.note == ""

    asyncio.run(main())
