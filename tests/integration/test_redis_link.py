"""The limit calls' own Redis connection (proxy.state.resp) against a real redis-server:
password and database from the URL, scripts Redis forgot, a reply too late."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from proxy.state import LEASE, WINDOW, Claim, StateUnavailable
from proxy.state.redis import RedisState
from tests.support.redis import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@contextlib.asynccontextmanager
async def opened(url: str, timeout: float = 2.0) -> AsyncIterator[RedisState]:
    state = RedisState(url, timeout=timeout)
    try:
        yield state
    finally:
        await state.close()


def rid() -> str:
    return uuid.uuid4().hex


def wait_asleep(port: int, timeout: float = 5.0) -> None:
    """Until a PING goes unanswered (a DEBUG SLEEP runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(0.1)
            s.sendall(b"PING\r\n")
            try:
                s.recv(16)
            except TimeoutError:
                return
        time.sleep(0.02)
    raise AssertionError("redis never went to sleep")


async def test_password_and_database_from_the_url(server: RedisServer) -> None:
    admin = redis.Redis(port=server.port)
    admin.config_set("requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    claim = Claim("pw:rpm", WINDOW, limit=5, seconds=60)
    async with opened(url) as state:
        assert (await state.reserve(rid(), [claim])).admitted
        db3 = redis.Redis(port=server.port, password="s3cret", db=3)
        assert db3.exists("vw:pw:rpm") == 1
        assert redis.Redis(port=server.port, password="s3cret", db=0).exists("vw:pw:rpm") == 0
    async with opened(f"redis://:nope@127.0.0.1:{server.port}/3") as wrong:
        with pytest.raises(StateUnavailable):
            await wrong.reserve(rid(), [claim])


async def test_a_script_redis_forgot_is_sent_again(server: RedisServer) -> None:
    lease = Claim("fl:par", LEASE, limit=2, seconds=60)
    async with opened(server.url) as state:
        assert (await state.reserve(rid(), [lease])).admitted
        redis.Redis(port=server.port).script_flush()
        outcome = await state.reserve(rid(), [lease])
        assert outcome.admitted and outcome.used == [2]


async def test_a_late_reply_fails_the_call_then_the_link_recovers(server: RedisServer) -> None:
    claim = Claim("late:rpm", WINDOW, limit=100, seconds=60)
    async with opened(server.url, timeout=0.2) as state:
        assert (await state.reserve(rid(), [claim])).admitted
        sleeper = threading.Thread(
            target=lambda: redis.Redis(port=server.port, socket_timeout=30).execute_command(
                "DEBUG", "SLEEP", "3"
            )
        )
        sleeper.start()
        await asyncio.to_thread(wait_asleep, server.port)
        with pytest.raises(StateUnavailable):
            await state.reserve(rid(), [claim])
        await asyncio.to_thread(sleeper.join, 30)
        outcome = await state.reserve(rid(), [claim])
        assert outcome.admitted
        # The refused call may or may not have been applied when Redis woke up: 2 or 3.
        assert outcome.used[0] in (2, 3)
