"""One upstream in rotation: its pooled client, weight, models, load and health.

Health is a small state machine per endpoint (nginx ``max_fails`` / Envoy outlier
detection in spirit):

* **healthy**: in rotation. ``eject_after`` consecutive failures (no connection, a
  timeout, a 5xx answer) or one failed active probe eject it.
* **ejected**: out of rotation until ``down_until``; each ejection doubles the
  backoff (from ``eject_backoff`` up to ``eject_backoff_max``).
* after ``down_until``: one **trial** request (or a successful active probe) may go
  there; success puts it back in rotation and resets the backoff, failure ejects it
  again for longer.

The router never leaves a request with nowhere to go because of errors alone: when
every candidate is ejected, the least recently failed one is still tried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from proxy.configfile import RoutingSpec, UpstreamSpec
from proxy.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Load:
    """vLLM's own figures for one upstream, from its ``/metrics``, and when they were read."""

    waiting: float
    running: float
    kv_cache: float
    at: float


class Endpoint:
    """One upstream: :class:`Upstream` (its own pooled client) plus routing state."""

    __slots__ = (
        "backoff",
        "down_until",
        "failures",
        "healthy",
        "in_flight",
        "last_error",
        "last_failure",
        "load",
        "model_objects",
        "models",
        "retired",
        "rr_weight",
        "rules",
        "spec",
        "trial",
        "upstream",
        "url",
        "weight",
    )

    def __init__(self, upstream: Upstream, spec: UpstreamSpec, rules: RoutingSpec) -> None:
        self.upstream = upstream
        self.spec = spec
        self.url = upstream.public_url
        self.rules = rules
        self.weight = spec.weight
        # None: not known yet (discovered from the upstream's /v1/models).
        self.models: frozenset[str] | None = frozenset(spec.models) if spec.models else None
        self.model_objects: dict[str, dict[str, Any]] = {}
        self.in_flight = 0
        self.healthy = True
        self.trial = False
        self.failures = 0
        self.down_until = 0.0
        self.backoff = rules.eject_backoff
        self.last_error = ""
        self.last_failure = 0.0
        self.rr_weight = 0
        self.load: Load | None = None
        self.retired = False  # removed by a reload: finishing its requests in flight

    def update(self, spec: UpstreamSpec, rules: RoutingSpec) -> None:
        """A reload kept this upstream: take its new weight, models and rules."""
        self.spec = spec
        self.rules = rules
        self.weight = spec.weight
        if spec.models:
            self.models = frozenset(spec.models)
        else:  # discovered (again, by the next check when nothing is known yet)
            self.models = frozenset(self.model_objects) if self.model_objects else None
        self.backoff = min(max(self.backoff, rules.eject_backoff), rules.eject_backoff_max)

    def available(self, now: float) -> bool:
        """In rotation, or ejected with its backoff over and no trial request out yet."""
        if self.retired:
            return False
        return self.healthy or (now >= self.down_until and not self.trial)

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    # ---- passive health (answers of real requests) -----------------------------------------

    def succeeded(self) -> None:
        self.failures = 0
        self.trial = False
        if not self.healthy:
            self.rejoin()

    def failed(self, reason: str) -> bool:
        """Count a failure; True when it took the endpoint out of rotation."""
        now = time.monotonic()
        self.failures += 1
        self.last_error = reason
        self.last_failure = now
        if self.trial or (self.healthy and self.failures >= self.rules.eject_after):
            self.eject(now)
            return True
        return False

    # ---- transitions --------------------------------------------------------------------

    def eject(self, now: float) -> None:
        """Out of rotation for the current backoff; the next ejection waits twice as long."""
        self.healthy = False
        self.trial = False
        self.down_until = now + self.backoff
        self.backoff = min(self.backoff * 2, self.rules.eject_backoff_max)

    def rejoin(self) -> None:
        self.healthy = True
        self.trial = False
        self.failures = 0
        self.backoff = self.rules.eject_backoff

    def probe_failed(self, reason: str) -> None:
        """The active check got no healthy answer: out of rotation at once."""
        now = time.monotonic()
        self.last_error = reason
        self.last_failure = now
        if self.healthy:
            self.eject(now)

    def snapshot(self) -> dict[str, Any]:
        """What ``/health`` shows (the URL never carries credentials)."""
        load = self.load
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "weight": self.weight,
            "models": sorted(self.models) if self.models is not None else None,
            "last_error": self.last_error or None,
            "load": None
            if load is None
            else {
                "waiting": load.waiting,
                "running": load.running,
                "kv_cache_usage": load.kv_cache,
                "age_s": round(time.monotonic() - load.at, 3),
            },
        }
