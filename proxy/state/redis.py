"""Redis state: shared by every process and host.

The limit calls (reserve, settle, renew) and the key-value calls (get, put,
delete: the cache and idempotency, once or twice per request) go through a lean
connection of their own (``proxy.state.resp``); the rest (locks, indexes, peek)
uses redis-py's asyncio client.

Every operation that reads and then writes is one Lua script, so it is atomic in
Redis, and the clock is Redis's own (``TIME``), so hosts need not agree on the
time. The limit calls go in batches (``proxy.state.batch``): one script call
runs every reserve, settle and renew queued meanwhile, in order, and returns
their outcomes. ``reserve`` and ``settle`` remember their outcome under the
request id (``mark:r:<rid>``, ``mark:s:<rid>``, 30 s): redis-py retries a
command after a timeout, and a repeat must not charge twice (the limit calls'
own connection does not retry). Timeouts are short
(``[state] timeout``, default 0.25 s) so a slow Redis cannot stall a request for
long; failures become :class:`StateUnavailable`. The client reconnects by
itself on the next call, and re-sends a script Redis forgot after a restart.

Key layout (prefix ``vw:``): a sliding window ``K`` is a sorted set of request
ids by time, with ``K:a`` (id → amount) and ``K:s`` (their sum); a counter is a
string; leases a sorted set of ids by expiry; locks a string holding the owner;
an index a sorted set. Single Redis (or a primary with replicas/Sentinel):
scripts derive keys from their arguments, which Redis Cluster does not allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from proxy.state import Claim, Outcome, StateUnavailable
from proxy.state.batch import RESERVE, Batcher, OnError, Op
from proxy.state.resp import RedisLink, ReplyError, Script

PREFIX = "vw:"
MARK_MS = 30_000

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local function window(k, seconds, need, limit)
  local since = now - seconds
  local old = redis.call('ZRANGEBYSCORE', k, '-inf', fmt(since))
  for _, m in ipairs(old) do
    local a = tonumber(redis.call('HGET', k .. ':a', m) or '0')
    redis.call('DECRBY', k .. ':s', a)
    redis.call('HDEL', k .. ':a', m)
  end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', k, '-inf', fmt(since)) end
  local used = tonumber(redis.call('GET', k .. ':s') or '0')
  local first = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  local reset = 0
  if #first > 0 then reset = math.max(tonumber(first[2]) + seconds - now, 0) end
  local retry = 0
  if used + need > limit then
    retry = 1e9
    if need <= limit then
      local all = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
      local left = used
      for i = 1, #all, 2 do
        left = left - tonumber(redis.call('HGET', k .. ':a', all[i]) or '0')
        if left + need <= limit then
          retry = math.max(tonumber(all[i + 1]) + seconds - now, 0)
          break
        end
      end
    end
  end
  return used, reset, retry
end
local function leases(k, rid)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', fmt(now))
  local used = redis.call('ZCARD', k)
  if rid ~= '' and redis.call('ZSCORE', k, rid) then used = used - 1 end
  local first = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  local reset = 0
  if #first > 0 then reset = math.max(tonumber(first[2]) - now, 0) end
  return used, reset, reset
end
local function use(k, kind, seconds, need, limit, rid)
  if kind == 'window' then return window(k, seconds, need, limit) end
  if kind == 'counter' then
    return tonumber(redis.call('GET', k) or '0'), seconds, seconds
  end
  return leases(k, rid)
end
"""

# A batch (proxy.state.batch). ARGV: prefix, mark ms, then the ops as JSON, in order,
# each [op, rid, claims, actual] with claims [[key, kind, limit, seconds, amount, need]]
# (need null: the amount): op "r" reserve, "s" settle (actual[i]: claim i's real
# amount), "n" renew (the claims are leases).
# Returns JSON: per op, [admitted, used, reset, refused, retry_after] for a reserve, else 0.
_BATCH = (
    _COMMON
    + """
local prefix, markms = ARGV[1], ARGV[2]
local function reserve(rid, claims)
  local mark = prefix .. 'mark:r:' .. rid
  local seen = redis.call('GET', mark)
  if seen then return cjson.decode(seen) end
  local admitted, refused, retry_after = true, cjson.null, 0
  local used, reset = {}, {}
  for i, c in ipairs(claims) do
    if c[6] == cjson.null then c[6] = c[5] end
    local u, r, w = use(prefix .. c[1], c[2], c[4], c[6], c[3], rid)
    if admitted and u + c[6] > c[3] then
      admitted, refused, retry_after = false, i - 1, w
    end
    used[i], reset[i] = u, r
  end
  if admitted then
    for i, c in ipairs(claims) do
      local k, kind, seconds, amount = prefix .. c[1], c[2], c[4], c[5]
      local ms = math.ceil(seconds * 1000) + 1000
      if kind == 'window' then
        redis.call('ZADD', k, fmt(now), rid)
        redis.call('HSET', k .. ':a', rid, amount)
        redis.call('INCRBY', k .. ':s', amount)
        for _, x in ipairs({k, k .. ':a', k .. ':s'}) do redis.call('PEXPIRE', x, ms) end
        if reset[i] == 0 then reset[i] = seconds end
      elseif kind == 'counter' then
        if redis.call('INCRBY', k, amount) == amount then redis.call('PEXPIRE', k, ms) end
      else
        redis.call('ZADD', k, fmt(now + seconds), rid)
        redis.call('PEXPIRE', k, ms)
        if reset[i] <= 0 then reset[i] = seconds end
      end
      used[i] = used[i] + amount
    end
  end
  local out = {admitted, used, reset, refused, retry_after}
  redis.call('SET', mark, cjson.encode(out), 'PX', markms)
  return out
end
local function settle(rid, claims, amounts)
  if not redis.call('SET', prefix .. 'mark:s:' .. rid, '1', 'NX', 'PX', markms) then return 0 end
  for i, c in ipairs(claims) do
    local k, kind, reserved, actual = prefix .. c[1], c[2], c[5], amounts[i]
    if kind == 'window' then
      local old = redis.call('HGET', k .. ':a', rid)
      if old then
        redis.call('HSET', k .. ':a', rid, actual)
        redis.call('INCRBY', k .. ':s', actual - tonumber(old))
      end
    elseif kind == 'counter' then
      if actual ~= reserved and redis.call('EXISTS', k) == 1 then
        redis.call('INCRBY', k, actual - reserved)
      end
    else
      redis.call('ZREM', k, rid)
    end
  end
  return 0
end
local function renew(rid, claims)
  for _, c in ipairs(claims) do
    local k, seconds = prefix .. c[1], c[4]
    if redis.call('ZSCORE', k, rid) then
      redis.call('ZADD', k, fmt(now + seconds), rid)
      redis.call('PEXPIRE', k, math.ceil(seconds * 1000) + 1000)
    end
  end
  return 0
end
local out = {}
for i, op in ipairs(cjson.decode(ARGV[3])) do
  if op[1] == 'r' then out[i] = reserve(op[2], op[3])
  elseif op[1] == 's' then out[i] = settle(op[2], op[3], op[4])
  else out[i] = renew(op[2], op[3]) end
end
return cjson.encode(out)
"""
)

# ARGV: prefix, then per claim: key kind limit seconds
_PEEK = (
    _COMMON
    + """
local out = {}
for i = 2, #ARGV, 4 do
  local u, r = use(ARGV[1] .. ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 3]), 0,
                   tonumber(ARGV[i + 2]), '')
  table.insert(out, {u, r})
end
return cjson.encode(out)
"""
)

_LOCK = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_TIE_SLACK = 64  # members sharing the cursor's score that one page can step over


class RedisState:
    """State in the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``)."""

    name = "redis"

    def __init__(self, url: str, *, timeout: float = 0.25, prefix: str = PREFIX) -> None:
        self.url = url
        self.prefix = prefix
        self._r = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One quick retry (the scripts are safe to repeat), then fail fast.
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            health_check_interval=30,
        )
        self._link = RedisLink(url, timeout=timeout)
        self._batch = Script(self._link, _BATCH)
        self._batcher = Batcher(self._run_batch)
        self._peek = self._r.register_script(_PEEK)
        self._lock = self._r.register_script(_LOCK)
        self._unlock = self._r.register_script(_UNLOCK)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError, ReplyError) as exc:
            raise StateUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def _run_batch(self, batch: list[Op]) -> list[Any]:
        # Claims are tuples: orjson writes each as an array (default=tuple).
        ops = orjson.dumps([(op.kind, op.rid, op.claims, op.actual) for op in batch], default=tuple)
        raw = await self._batch(self.prefix, MARK_MS, ops)
        return [
            _outcome(r) if op.kind == RESERVE else None
            for op, r in zip(batch, orjson.loads(raw), strict=True)
        ]

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
        if not claims:
            return []
        args: list[Any] = [self.prefix]
        for c in claims:
            args += [c.key, c.kind, c.limit, c.seconds]
        raw = orjson.loads(await self._call(self._peek(args=args)))
        return [(int(u), float(r)) for u, r in raw]

    async def get(self, key: str) -> bytes | None:
        return await self._call(self._link.call("GET", self.prefix + "kv:" + key))

    async def put(
        self, key: str, value: bytes, ttl: float | None = None, *, only_if_absent: bool = False
    ) -> bool:
        args: list[bytes | str | int] = ["SET", self.prefix + "kv:" + key, value]
        if ttl is not None:
            args += ["PX", max(int(ttl * 1000), 1)]
        if only_if_absent:
            args.append("NX")
        return await self._call(self._link.call(*args)) is not None

    async def delete(self, key: str) -> bool:
        return bool(await self._call(self._link.call("DEL", self.prefix + "kv:" + key)))

    async def lock(self, key: str, owner: str, ttl: float) -> bool:
        keys = [self.prefix + "lock:" + key]
        return bool(await self._call(self._lock(keys=keys, args=[owner, max(int(ttl * 1000), 1)])))

    async def unlock(self, key: str, owner: str) -> bool:
        keys = [self.prefix + "lock:" + key]
        return bool(await self._call(self._unlock(keys=keys, args=[owner])))

    async def index_add(self, index: str, member: str, score: float, ttl: float) -> None:
        name = self.prefix + "idx:" + index
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zadd(name, {member: score})
            pipe.pexpire(name, max(int(ttl * 1000), 1))
            await self._call(pipe.execute())

    async def index_remove(self, index: str, member: str) -> None:
        await self._call(self._r.zrem(self.prefix + "idx:" + index, member))

    async def index_page(
        self, index: str, limit: int, after: tuple[float, str] | None = None
    ) -> list[tuple[str, float]]:
        name = self.prefix + "idx:" + index
        top = "+inf" if after is None else repr(after[0])
        rows = await self._call(
            self._r.zrevrangebyscore(
                name, top, "-inf", start=0, num=limit + _TIE_SLACK, withscores=True
            )
        )
        items = [(m.decode() if isinstance(m, bytes) else m, float(s)) for m, s in rows]
        # Redis orders ties by member descending, as the contract does.
        if after is not None:
            items = [(m, s) for m, s in items if s < after[0] or m < after[1]]
        return items[:limit]

    async def ping(self) -> bool:
        return bool(await self._call(self._r.ping()))

    async def close(self) -> None:
        await self._batcher.drain(timeout=1.0)
        await self._link.close()
        await self._r.aclose()


def _outcome(raw: list[Any]) -> Outcome:
    # Lua numbers: integral ones come back as JSON integers. cjson writes an empty table
    # as {}.
    admitted, used, reset, refused, retry_after = raw
    return Outcome(
        admitted,
        used if isinstance(used, list) else [],
        reset if isinstance(reset, list) else [],
        refused,
        retry_after,
    )
