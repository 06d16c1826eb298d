"""One contract for every state backend: memory, SQLite (a file) and Redis (a real
``redis-server`` process). Each test runs against all three."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from proxy.state import COUNTER, LEASE, WINDOW, Claim, State, StateUnavailable
from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState
from proxy.state.sqlite import SQLiteState
from tests.support.redis import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


Factory = Callable[[], State]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make_state(request, tmp_path) -> AsyncIterator[Factory]:
    """A factory of State handles on one shared store (two handles = two processes)."""
    made: list[State] = []
    memory = MemoryState(max_bytes=4 * 1024 * 1024)
    prefix = f"t{uuid.uuid4().hex[:8]}:"

    def make() -> State:
        if request.param == "memory":
            return memory
        if request.param == "sqlite":
            state: State = SQLiteState(str(tmp_path / "state.db"))
        else:
            server = request.getfixturevalue("redis_server")
            state = RedisState(server.url, prefix=prefix, timeout=2.0)
        made.append(state)
        return state

    yield make
    for state in made:
        await state.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def rid() -> str:
    return uuid.uuid4().hex


async def test_window_admits_up_to_the_limit(make_state: Factory) -> None:
    state = make_state()
    claim = Claim("k:rpm", WINDOW, limit=3, seconds=60)
    outcomes = [await state.reserve(rid(), [claim]) for _ in range(4)]
    assert [o.admitted for o in outcomes] == [True, True, True, False]
    assert [o.used[0] for o in outcomes[:3]] == [1, 2, 3]
    refused = outcomes[3]
    assert refused.refused == 0
    assert refused.used == [3]
    assert 0 < refused.retry_after <= 60
    assert 0 < refused.reset[0] <= 60


async def test_reserve_and_settle_are_idempotent_per_request_id(make_state: Factory) -> None:
    state = make_state()
    claims = [
        Claim("k:tpm", WINDOW, limit=1000, seconds=60, amount=100),
        Claim("k:day", COUNTER, limit=1000, seconds=3600, amount=100, need=1),
    ]
    r = rid()
    first = await state.reserve(r, claims)
    again = await state.reserve(r, claims)
    assert first.admitted and again.admitted
    assert again.used == first.used == [100, 100]
    assert await state.peek(claims) == [(100, pytest.approx(60, abs=1)), (100, 3600)]
    await state.settle(r, claims, [30, 30])
    await state.settle(r, claims, [30, 30])
    assert [u for u, _ in await state.peek(claims)] == [30, 30]


async def test_all_or_nothing(make_state: Factory) -> None:
    state = make_state()
    claims = [
        Claim("a:rpm", WINDOW, limit=10, seconds=60),
        Claim("a:day", COUNTER, limit=5, seconds=3600, amount=5, need=1),
    ]
    assert (await state.reserve(rid(), claims)).admitted
    second = await state.reserve(rid(), claims)
    assert not second.admitted and second.refused == 1
    assert [u for u, _ in await state.peek(claims)] == [1, 5]  # the window was not charged


async def test_token_window_retry_after_counts_what_must_expire(make_state: Factory) -> None:
    state = make_state()

    def tpm(n: int) -> Claim:
        return Claim("b:tpm", WINDOW, limit=100, seconds=30, amount=n)

    assert (await state.reserve(rid(), [tpm(60)])).admitted
    assert (await state.reserve(rid(), [tpm(30)])).admitted
    refused = await state.reserve(rid(), [tpm(50)])
    assert not refused.admitted and refused.used == [90]
    assert 25 < refused.retry_after <= 30  # the first entry must leave; the second can stay
    assert (await state.reserve(rid(), [tpm(10)])).admitted


async def test_window_entries_expire(make_state: Factory) -> None:
    state = make_state()
    claim = Claim("c:rpm", WINDOW, limit=1, seconds=0.3)
    assert (await state.reserve(rid(), [claim])).admitted
    assert not (await state.reserve(rid(), [claim])).admitted

    async def free() -> bool:
        return (await state.peek([claim]))[0][0] == 0

    await eventually(free)
    assert (await state.reserve(rid(), [claim])).admitted


async def test_counter_corrections_and_expiry(make_state: Factory) -> None:
    state = make_state()
    claim = Claim("d:day", COUNTER, limit=100, seconds=0.5, amount=40, need=1)
    r = rid()
    assert (await state.reserve(r, [claim])).admitted
    await state.settle(r, [claim], [70])
    assert (await state.peek([claim]))[0][0] == 70
    assert (await state.reserve(rid(), [claim])).admitted  # 70 < 100: something is left
    assert not (await state.reserve(rid(), [claim])).admitted  # 110 >= 100

    async def gone() -> bool:
        return (await state.peek([claim]))[0][0] == 0

    await eventually(gone)


async def test_leases_release_expire_and_renew(make_state: Factory) -> None:
    state = make_state()
    lease = Claim("e:par", LEASE, limit=2, seconds=60)
    a, b = rid(), rid()
    assert (await state.reserve(a, [lease])).admitted
    assert (await state.reserve(b, [lease])).admitted
    refused = await state.reserve(rid(), [lease])
    assert not refused.admitted and refused.used == [2]
    await state.settle(a, [lease], [1])
    assert (await state.reserve(rid(), [lease])).admitted

    short = Claim("f:par", LEASE, limit=1, seconds=0.4)
    holder = rid()
    assert (await state.reserve(holder, [short])).admitted
    await state.renew(holder, [short])
    assert not (await state.reserve(rid(), [short])).admitted

    async def expired() -> bool:
        return (await state.peek([short]))[0][0] == 0

    await eventually(expired)  # never settled (a dead gateway): the lease runs out
    await state.renew(holder, [short])  # renewing an expired lease does not bring it back
    assert (await state.reserve(rid(), [short])).admitted


async def test_concurrent_handles_never_overrun(make_state: Factory) -> None:
    one, two = make_state(), make_state()
    claim = Claim("g:rpm", WINDOW, limit=20, seconds=60)
    results = await asyncio.gather(
        *[(one if i % 2 else two).reserve(rid(), [claim]) for i in range(50)]
    )
    assert sum(o.admitted for o in results) == 20
    assert (await one.peek([claim]))[0][0] == 20


async def test_queued_settlements_come_before_later_reservations(make_state: Factory) -> None:
    """settle_soon returns at once; a reservation made after it sees the slot free
    (in one process the calls are applied in the order they were made)."""
    state = make_state()
    lease = Claim("q:par", LEASE, limit=1, seconds=60)
    tokens = Claim("q:tpm", WINDOW, limit=1000, seconds=60, amount=500)
    failures: list[StateUnavailable] = []
    for _ in range(5):
        holder = rid()
        outcome = await state.reserve(holder, [lease, tokens])
        assert outcome.admitted, outcome
        state.settle_soon(holder, [lease, tokens], [1, 10], failures.append)
    last = await state.reserve(rid(), [lease, tokens])
    assert last.admitted and last.used == [1, 5 * 10 + 500]
    assert failures == []


async def test_close_sends_queued_settlements(make_state: Factory) -> None:
    one = make_state()
    lease = Claim("c:par", LEASE, limit=1, seconds=60)
    holder = rid()
    assert (await one.reserve(holder, [lease])).admitted
    one.settle_soon(holder, [lease], [1], lambda exc: None)
    await one.close()
    assert (await make_state().peek([lease]))[0][0] == 0


async def test_a_cancelled_reservation_frees_its_slot(make_state: Factory) -> None:
    """A caller cancelled while its reservation is on its way (a client gone): the
    slot is freed as soon as the answer comes, not when the lease runs out."""
    state = make_state()
    if state.name == "memory":
        pytest.skip("the memory backend answers without waiting: nothing to cancel")
    lease = Claim("x:par", LEASE, limit=1, seconds=60)
    waiting = asyncio.ensure_future(state.reserve(rid(), [lease]))
    await asyncio.sleep(0)  # queued, not answered yet
    assert not waiting.done()
    waiting.cancel()

    async def admitted() -> bool:
        return (await state.reserve(rid(), [lease])).admitted

    await eventually(admitted, timeout=5)  # well before the lease's 60 s


async def test_key_value(make_state: Factory) -> None:
    state = make_state()
    assert await state.get("x") is None
    assert await state.put("x", b"1")
    assert await state.get("x") == b"1"
    assert not await state.put("x", b"2", only_if_absent=True)
    assert await state.get("x") == b"1"
    assert await state.put("x", b"3")
    assert await state.get("x") == b"3"
    assert await state.delete("x")
    assert not await state.delete("x")
    assert await state.put("y", b"short", ttl=0.3, only_if_absent=True)

    async def expired() -> bool:
        return await state.get("y") is None

    await eventually(expired)
    assert await state.put("y", b"again", only_if_absent=True)  # an expired value is absent


async def test_key_value_holds_large_binary_values(make_state: Factory) -> None:
    """The response cache stores answers of a megabyte or more, any bytes."""
    state = make_state()
    value = bytes(range(256)) * 4096 + b"\n\0data: [DONE]\n\n"
    assert await state.put("big", value, ttl=60)
    assert await state.get("big") == value


async def test_set_if_absent_has_one_winner_across_handles(make_state: Factory) -> None:
    """Idempotency: of many concurrent first attempts (any gateway) exactly one claims."""
    one, two = make_state(), make_state()
    won = await asyncio.gather(
        *[
            (one if i % 2 else two).put("idem", b"P%d" % i, 60, only_if_absent=True)
            for i in range(20)
        ]
    )
    assert sum(won) == 1
    assert await one.get("idem") == b"P%d" % won.index(True)


async def test_overwrite_replaces_the_ttl(make_state: Factory) -> None:
    """An in-progress record (short lease) becomes the finished one (long retention)."""
    state = make_state()
    assert await state.put("rec", b"pending", ttl=0.3, only_if_absent=True)
    assert await state.put("rec", b"done", ttl=60)
    await asyncio.sleep(0.5)
    assert await state.get("rec") == b"done"


async def test_memory_key_value_is_bounded_lru() -> None:
    state = MemoryState(max_bytes=10)
    await state.put("a", b"aaaa")
    await state.put("b", b"bbbb")
    assert await state.get("a") == b"aaaa"  # a is now the most recently used
    await state.put("c", b"cccc")
    assert await state.get("b") is None
    assert await state.get("a") == b"aaaa" and await state.get("c") == b"cccc"
    assert not await state.put("huge", b"x" * 11)


async def test_lock_has_owner_and_expiry(make_state: Factory) -> None:
    state = make_state()
    assert await state.lock("conv1", "a", 60)
    assert not await state.lock("conv1", "b", 60)
    assert await state.lock("conv1", "a", 0.3)  # the owner extends (here: shortens) it
    assert not await state.unlock("conv1", "b")

    async def free() -> bool:
        return await state.lock("conv1", "b", 60)

    await eventually(free)
    assert not await state.unlock("conv1", "a")
    assert await state.unlock("conv1", "b")
    assert await state.lock("conv1", "a", 60)


async def test_index_pages_newest_first(make_state: Factory) -> None:
    state = make_state()
    for i, score in enumerate([1.0, 5.0, 3.0, 5.0, 2.0]):
        await state.index_add("owner1", f"m{i}", score, ttl=60)
    first = await state.index_page("owner1", 2)
    assert first == [("m3", 5.0), ("m1", 5.0)]
    second = await state.index_page("owner1", 2, after=(first[-1][1], first[-1][0]))
    assert second == [("m2", 3.0), ("m4", 2.0)]
    third = await state.index_page("owner1", 2, after=(second[-1][1], second[-1][0]))
    assert third == [("m0", 1.0)]
    await state.index_remove("owner1", "m2")
    assert [m for m, _ in await state.index_page("owner1", 10)] == ["m3", "m1", "m4", "m0"]
    assert await state.index_page("nobody", 10) == []
    await state.index_add("brief", "x", 1.0, ttl=0.3)

    async def expired() -> bool:
        return await state.index_page("brief", 10) == []

    await eventually(expired)


async def test_redis_down_then_back(tmp_path) -> None:
    server = RedisServer().start()
    state = RedisState(server.url, timeout=0.5, prefix="down:")
    claim = Claim("k:rpm", WINDOW, limit=5, seconds=60)
    try:
        assert (await state.reserve(rid(), [claim])).admitted
        server.stop()
        with pytest.raises(StateUnavailable):
            await state.reserve(rid(), [claim])
        with pytest.raises(StateUnavailable):
            await state.get("x")
        server.start()  # same port, empty (no persistence), scripts forgotten
        assert (await state.reserve(rid(), [claim])).admitted
        assert (await state.peek([claim]))[0][0] == 1
    finally:
        await state.close()
        server.__exit__()
