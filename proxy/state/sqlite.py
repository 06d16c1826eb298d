"""Embedded SQLite state: one file that every process on the host shares.

Exact for any number of ``--workers``: each operation is one ``BEGIN IMMEDIATE``
transaction (a write lock on the file for its duration, a few hundred
microseconds), so two processes never interleave a check and its charge; the
limit calls made while one transaction runs share the next one
(``proxy.state.batch``). WAL journaling lets readers go on meanwhile. The file
survives restarts, so quota totals do. Calls run on one worker thread per
process, off the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy.state import Claim, Outcome, StateUnavailable
from proxy.state.batch import Batcher, OnError, Op
from proxy.state.local import LocalLimits

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS marks(name TEXT PRIMARY KEY, value BLOB, expires REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS windows(
    key TEXT, member TEXT, t REAL, amount INTEGER, expires REAL, PRIMARY KEY(key, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS windows_t ON windows(key, t);
CREATE TABLE IF NOT EXISTS wsum(key TEXT PRIMARY KEY, total INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters(key TEXT PRIMARY KEY, value INTEGER, expires REAL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases(key TEXT, member TEXT, expires REAL, PRIMARY KEY(key, member))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value BLOB, expires REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks(key TEXT PRIMARY KEY, owner TEXT, expires REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idx(name TEXT, member TEXT, score REAL, PRIMARY KEY(name, member))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_score ON idx(name, score, member);
CREATE TABLE IF NOT EXISTS idx_meta(name TEXT PRIMARY KEY, expires REAL) WITHOUT ROWID;
"""

_INF = 1e300  # "never expires" in a REAL column
_SWEEP_EVERY = 2000  # operations between deletions of expired rows


class SQLiteState(LocalLimits):
    """State in the SQLite file at ``path`` (created with its directory if missing)."""

    name = "sqlite"

    def __init__(self, path: str, *, timeout: float = 2.0, clock=time.time) -> None:
        self.path = path
        self.timeout = timeout
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-state")
        self._ops = 0
        self._batcher = Batcher(self._run_batch, depth=2)
        self._closed = False

    # ---- plumbing -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                Path(self.path).expanduser(),
                timeout=self.timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            # Switching to WAL needs the file to itself for a moment: another process
            # opening it at the same time gets "locked" at once (no busy wait), so retry.
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
                    break
                except sqlite3.OperationalError:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    if time.monotonic() > deadline:
                        db.close()
                        raise
                    time.sleep(0.01)
            db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
        return self._db

    def _tx(self, fn: Callable[[float], T]) -> T:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            now = self.clock()
            result = fn(now)
            self._ops += 1
            if self._ops % _SWEEP_EVERY == 0:
                self._sweep(db, now)
            db.execute("COMMIT")
            return result
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _sweep(db: sqlite3.Connection, now: float) -> None:
        for table in ("marks", "counters", "leases", "kv", "locks"):
            db.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,))
        # Windows nobody asked about lately: drop old entries, then re-add the sums.
        if db.execute("DELETE FROM windows WHERE expires <= ?", (now,)).rowcount:
            db.execute(
                "UPDATE wsum SET total=(SELECT COALESCE(SUM(amount),0) FROM windows w "
                "WHERE w.key=wsum.key)"
            )
            db.execute("DELETE FROM wsum WHERE total=0")
        db.execute(
            "DELETE FROM idx WHERE name IN (SELECT name FROM idx_meta WHERE expires <= ?)", (now,)
        )
        db.execute("DELETE FROM idx_meta WHERE expires <= ?", (now,))

    async def _run(self, fn: Callable[[float], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._tx, fn)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"sqlite state {self.path}: {exc}") from exc

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        row = self._connect().execute(sql, args).fetchone()
        return None if row is None else row[0]

    def _exec(self, sql: str, args: tuple[Any, ...]) -> int:
        return self._connect().execute(sql, args).rowcount

    # ---- limit primitives (inside a transaction) ------------------------------------------

    def mark_get(self, name: str, now: float) -> Any:
        raw = self._one("SELECT value FROM marks WHERE name=? AND expires>?", (name, now))
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Outcome(*data) if isinstance(data, list) else data

    def mark_set(self, name: str, value: Any, expires: float) -> None:
        if isinstance(value, Outcome):
            value = [value.admitted, value.used, value.reset, value.refused, value.retry_after]
        self._exec(
            "INSERT OR REPLACE INTO marks VALUES (?,?,?)", (name, orjson.dumps(value), expires)
        )

    def win_use(self, key: str, since: float) -> tuple[int, float | None]:
        db = self._connect()
        gone, count = db.execute(
            "SELECT COALESCE(SUM(amount),0), COUNT(*) FROM windows WHERE key=? AND t<=?",
            (key, since),
        ).fetchone()
        if count:
            db.execute("DELETE FROM windows WHERE key=? AND t<=?", (key, since))
            db.execute("UPDATE wsum SET total=total-? WHERE key=?", (gone, key))
        oldest, total = db.execute(
            "SELECT MIN(t), (SELECT total FROM wsum WHERE key=?1) FROM windows WHERE key=?1",
            (key,),
        ).fetchone()
        if oldest is None:
            db.execute("DELETE FROM wsum WHERE key=?", (key,))
            return 0, None
        return int(total or 0), oldest

    def win_entries(self, key: str) -> list[tuple[float, int]]:
        return (
            self._connect()
            .execute("SELECT t, amount FROM windows WHERE key=? ORDER BY t", (key,))
            .fetchall()
        )

    def _wsum_add(self, key: str, delta: int) -> None:
        self._exec(
            "INSERT INTO wsum VALUES (?,?) ON CONFLICT(key) DO UPDATE SET total=total+?",
            (key, delta, delta),
        )

    def win_add(self, key: str, member: str, t: float, amount: int, expires: float) -> None:
        row = (key, member, t, amount, expires)
        if self._exec("INSERT OR IGNORE INTO windows VALUES (?,?,?,?,?)", row):
            self._wsum_add(key, amount)  # a new entry: the usual case
            return
        old = self._one("SELECT amount FROM windows WHERE key=? AND member=?", (key, member))
        self._exec("INSERT OR REPLACE INTO windows VALUES (?,?,?,?,?)", row)
        self._wsum_add(key, amount - (old or 0))

    def win_set(self, key: str, member: str, amount: int) -> None:
        old = self._one("SELECT amount FROM windows WHERE key=? AND member=?", (key, member))
        if old is not None:
            self._exec(
                "UPDATE windows SET amount=? WHERE key=? AND member=?", (amount, key, member)
            )
            self._wsum_add(key, amount - old)

    def ctr_get(self, key: str, now: float) -> int:
        value = self._one("SELECT value FROM counters WHERE key=? AND expires>?", (key, now))
        return int(value or 0)

    def ctr_add(self, key: str, delta: int, expires: float, now: float, *, create: bool) -> None:
        done = self._exec(
            "UPDATE counters SET value=value+? WHERE key=? AND expires>?", (delta, key, now)
        )
        if not done and create:
            self._exec("INSERT OR REPLACE INTO counters VALUES (?,?,?)", (key, delta, expires))

    def lease_use(self, key: str, now: float, rid: str) -> tuple[int, float | None]:
        db = self._connect()
        db.execute("DELETE FROM leases WHERE key=? AND expires<=?", (key, now))
        count, mine, first = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(member=?),0), MIN(expires) FROM leases WHERE key=?",
            (rid, key),
        ).fetchone()
        return count - mine, first

    def lease_held(self, key: str, now: float, rid: str) -> bool:
        return bool(
            self._one(
                "SELECT 1 FROM leases WHERE key=? AND member=? AND expires>?", (key, rid, now)
            )
        )

    def lease_set(self, key: str, member: str, expires: float) -> None:
        self._exec("INSERT OR REPLACE INTO leases VALUES (?,?,?)", (key, member, expires))

    def lease_del(self, key: str, member: str) -> None:
        self._exec("DELETE FROM leases WHERE key=? AND member=?", (key, member))

    # ---- State --------------------------------------------------------------------------

    async def _run_batch(self, batch: list[Op]) -> list[Any]:
        return await self._run(lambda now: self.run_now(batch, now))

    async def reserve(self, rid: str, claims: Sequence[Claim]) -> Outcome:
        return await self._batcher.reserve(rid, claims)

    async def settle(self, rid: str, claims: Sequence[Claim], actual: Sequence[int]) -> None:
        await self._batcher.settle(rid, claims, actual)

    def settle_soon(
        self, rid: str, claims: Sequence[Claim], actual: Sequence[int], on_error: OnError
    ) -> None:
        self._batcher.settle_soon(rid, claims, actual, on_error)

    async def renew(self, rid: str, claims: Sequence[Claim]) -> None:
        await self._batcher.renew(rid, claims)

    async def peek(self, claims: Sequence[Claim]) -> list[tuple[int, float]]:
        return await self._run(lambda now: self.peek_now(claims, now))

    async def get(self, key: str) -> bytes | None:
        return await self._run(
            lambda now: self._one("SELECT value FROM kv WHERE key=? AND expires>?", (key, now))
        )

    async def put(
        self, key: str, value: bytes, ttl: float | None = None, *, only_if_absent: bool = False
    ) -> bool:
        def op(now: float) -> bool:
            expires = now + ttl if ttl is not None else _INF
            if only_if_absent:
                self._exec("DELETE FROM kv WHERE key=? AND expires<=?", (key, now))
                return bool(
                    self._exec("INSERT OR IGNORE INTO kv VALUES (?,?,?)", (key, value, expires))
                )
            self._exec("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, value, expires))
            return True

        return await self._run(op)

    async def delete(self, key: str) -> bool:
        def op(now: float) -> bool:
            live = bool(self._exec("DELETE FROM kv WHERE key=? AND expires>?", (key, now)))
            self._exec("DELETE FROM kv WHERE key=?", (key,))
            return live

        return await self._run(op)

    async def lock(self, key: str, owner: str, ttl: float) -> bool:
        def op(now: float) -> bool:
            held = (
                self._connect()
                .execute("SELECT owner FROM locks WHERE key=? AND expires>?", (key, now))
                .fetchone()
            )
            if held is not None and held[0] != owner:
                return False
            self._exec("INSERT OR REPLACE INTO locks VALUES (?,?,?)", (key, owner, now + ttl))
            return True

        return await self._run(op)

    async def unlock(self, key: str, owner: str) -> bool:
        return await self._run(
            lambda now: bool(
                self._exec(
                    "DELETE FROM locks WHERE key=? AND owner=? AND expires>?", (key, owner, now)
                )
            )
        )

    def _index_live(self, index: str, now: float) -> bool:
        expires = self._one("SELECT expires FROM idx_meta WHERE name=?", (index,))
        if expires is not None and expires <= now:
            self._exec("DELETE FROM idx WHERE name=?", (index,))
            self._exec("DELETE FROM idx_meta WHERE name=?", (index,))
            return False
        return expires is not None

    async def index_add(self, index: str, member: str, score: float, ttl: float) -> None:
        def op(now: float) -> None:
            self._index_live(index, now)
            self._exec("INSERT OR REPLACE INTO idx VALUES (?,?,?)", (index, member, score))
            self._exec("INSERT OR REPLACE INTO idx_meta VALUES (?,?)", (index, now + ttl))

        await self._run(op)

    async def index_remove(self, index: str, member: str) -> None:
        await self._run(
            lambda now: self._exec("DELETE FROM idx WHERE name=? AND member=?", (index, member))
        )

    async def index_page(
        self, index: str, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[str, float]]:
        def op(now: float) -> list[tuple[str, float]]:
            if not self._index_live(index, now):
                return []
            if after is None:
                sql = "SELECT member, score FROM idx WHERE name=?"
                args: tuple[Any, ...] = (index,)
            else:
                sql = (
                    "SELECT member, score FROM idx WHERE name=? AND "
                    "(score<? OR (score=? AND member<?))"
                )
                args = (index, after[0], after[0], after[1])
            sql += " ORDER BY score DESC, member DESC LIMIT ?"
            return [(m, s) for m, s in self._connect().execute(sql, (*args, limit))]

        return await self._run(op)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._batcher.drain(timeout=max(self.timeout, 1.0))

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=False)
