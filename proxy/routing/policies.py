"""Balancing policies: each picks one endpoint from a non-empty list of available ones.

* ``least-busy``: power of two random choices (drawn by weight), the one with fewer
  requests in flight per unit of weight wins.
* ``round-robin``: nginx's smooth weighted round robin.
* ``session``: rendezvous (highest random weight) hashing of the session key, so a
  session returns to its upstream whenever that one is available; no key: least-busy.
* ``load-aware``: power of two choices on vLLM's own queue (``num_requests_waiting``),
  then our requests in flight, then KV-cache use; figures older than ``stale`` seconds
  for any candidate: least-busy.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence

from proxy.routing.endpoint import Endpoint

Policy = Callable[[Sequence[Endpoint], "str | None", float], Endpoint]


def _two(eps: Sequence[Endpoint], rng: random.Random) -> tuple[Endpoint, Endpoint]:
    """Two distinct endpoints, each drawn with probability proportional to its weight."""
    weights = [e.weight for e in eps]
    i = _draw(weights, rng)
    weights[i] = 0
    j = _draw(weights, rng)
    return eps[i], eps[j]


def _draw(weights: list[int], rng: random.Random) -> int:
    x = rng.random() * sum(weights)
    for i, w in enumerate(weights):
        x -= w
        if x < 0 and w:
            return i
    return max(range(len(weights)), key=weights.__getitem__)


class LeastBusy:
    name = "least-busy"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __call__(self, eps: Sequence[Endpoint], key: str | None, now: float) -> Endpoint:
        if len(eps) == 1:
            return eps[0]
        a, b = _two(eps, self.rng)
        return b if b.in_flight * a.weight < a.in_flight * b.weight else a


class RoundRobin:
    name = "round-robin"

    def __call__(self, eps: Sequence[Endpoint], key: str | None, now: float) -> Endpoint:
        if len(eps) == 1:
            return eps[0]
        total = 0
        best = eps[0]
        for e in eps:
            e.rr_weight += e.weight
            total += e.weight
            if e.rr_weight > best.rr_weight:
                best = e
        best.rr_weight -= total
        return best


def rendezvous_score(key: str, url: str, weight: int) -> float:
    """Weighted highest-random-weight score of ``url`` for ``key`` (larger wins)."""
    digest = hashlib.blake2b(f"{key}\x00{url}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # in (0, 1)
    return -weight / math.log(unit)


class Session:
    name = "session"

    def __init__(self, fallback: LeastBusy) -> None:
        self.fallback = fallback

    def __call__(self, eps: Sequence[Endpoint], key: str | None, now: float) -> Endpoint:
        if key is None or len(eps) == 1:
            return self.fallback(eps, key, now)
        return max(eps, key=lambda e: rendezvous_score(key, e.url, e.weight))


class LoadAware:
    name = "load-aware"

    def __init__(self, fallback: LeastBusy, stale: float) -> None:
        self.fallback = fallback
        self.stale = stale
        self.rng = fallback.rng

    def __call__(self, eps: Sequence[Endpoint], key: str | None, now: float) -> Endpoint:
        if len(eps) == 1:
            return eps[0]
        for e in eps:
            if e.load is None or now - e.load.at > self.stale:
                return self.fallback(eps, key, now)
        a, b = _two(eps, self.rng)
        return b if _score(b) < _score(a) else a


def _score(e: Endpoint) -> tuple[float, float, float]:
    load = e.load
    assert load is not None
    return (load.waiting / e.weight, e.in_flight / e.weight, load.kv_cache)


def make_policy(name: str, *, stale: float, rng: random.Random | None = None) -> Policy:
    least = LeastBusy(rng)
    if name == "round-robin":
        return RoundRobin()
    if name == "session":
        return Session(least)
    if name == "load-aware":
        return LoadAware(least, stale)
    return least
