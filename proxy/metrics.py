"""Prometheus metrics: the registry, the per-request middleware and ``GET /metrics``.

Every name starts with ``vllm_wrapper_`` (never vLLM's ``vllm:`` nor generic ``http_*``):
the gateway's series sit beside vLLM's own. Labels are bounded whatever clients send:

- ``route``: a template from :func:`route_of` (``/v1/chat/completions``, ``/v1/*`` for
  the other relayed paths, ``other`` for a path the gateway does not serve);
- ``model``: a name the gateway serves (the ``served`` set it is handed), ``other`` for
  any other name, ``none`` when the request named no model;
- ``key``: the key's name (``default`` for ``VLLM_WRAPPER_API_KEY``), ``anonymous``
  when auth is off or the path is public, ``invalid`` for a refused key;
- ``method``: the usual HTTP methods, ``other`` for the rest; ``upstream``: the URL
  without credentials; ``status``: the status sent (``499`` when the client left
  before any was, ``0`` when none was sent for another reason).

:class:`proxy.front.Front` records each request once, when it ends, from
its :class:`~proxy.accesslog.RequestInfo`: arrival → first body byte (TTFB), → end
(duration), the gateway's own time up to the response headers minus the upstream's
(overhead, as ``Server-Timing``), a client disconnect → the upstream request closed
(abort latency), a stream's outcome, and what the other stages wrote there (key name,
model, token usage). The access log's send wrapper records the response's times, so
metrics add nothing per body chunk. The other stages report their
events with one call each: :meth:`Metrics.rate_limited`, :meth:`Metrics.upstream_request`,
:meth:`Metrics.upstream_health`, :meth:`Metrics.cache`. With metrics off they are
handed a :class:`NoMetrics`, whose methods do nothing, and nothing is recorded per request.

Several worker processes (``python -m proxy --workers N``) share the figures through
prometheus-client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` names a directory
where each process writes its values, and a scrape (any worker answers it) merges
every process's files. The CLI creates and empties that directory (README, "Metrics").
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    multiprocess,
    values,
)
from prometheus_client.exposition import choose_encoder

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Receive, Scope, Send
from proxy.config import ConfigError, Settings
from proxy.errors import Forbidden, MethodNotAllowed

if TYPE_CHECKING:
    from proxy.upstream import Upstream

log = logging.getLogger(__name__)

PREFIX = "vllm_wrapper_"

# Relayed paths with a route label of their own; the other /v1 paths share "/v1/*".
V1_ROUTES = frozenset(
    "/v1/" + p
    for p in (
        "chat/completions",
        "completions",
        "embeddings",
        "models",
        "responses",
        "score",
        "rerank",
        "tokenize",
        "detokenize",
        "audio/transcriptions",
        "audio/translations",
    )
)
# The gateway's own paths; a path below one of PREFIX_ROUTES takes its label.
ROUTES = frozenset(
    {
        "/",
        "/chat",
        "/chat/ws",
        "/health",
        "/models",
        "/metrics",
        "/usage",
        "/conversations",
        "/docs",
        "/openapi.json",
        "/playground",
        "/v1",
    }
)
PREFIX_ROUTES = (("/docs/", "/docs"), ("/conversations/", "/conversations"), ("/admin/", "/admin"))
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CACHE_RESULTS = frozenset({"hit", "miss", "bypass", "replay"})

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
ABORT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


def route_of(path: str) -> str:
    """The route template of a path relative to the gateway's root (bounded set)."""
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    if path.startswith("/v1/"):
        return path if path in V1_ROUTES else "/v1/*"
    if path in ROUTES:
        return path
    for prefix, route in PREFIX_ROUTES:
        if path.startswith(prefix):
            return route
    return "other"


def is_multiprocess() -> bool:
    """Whether prometheus-client was imported with ``PROMETHEUS_MULTIPROC_DIR`` set."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def prepare_multiproc_dir(path: str) -> None:
    """Create ``path`` and remove the metric files a previous run left there.

    prometheus-client requires the directory to be emptied between runs: its files
    would otherwise add an old run's counts to the new one's.
    """
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        os.remove(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(path: str) -> list[int]:
    """Drop the live-gauge files of processes that have exited (``mark_process_dead``).

    A worker that died (uvicorn starts a new one) leaves its in-flight gauge behind,
    which would count its requests as in flight forever. Its counter and histogram
    files stay: what it counted remains part of the totals.
    """
    dead = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid_text = name.rsplit("_", 1)[-1].removesuffix(".db")
        if pid_text.isdigit() and not _alive(int(pid_text)):
            dead.add(int(pid_text))
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    if dead:
        log.info("metrics: dropped the in-flight gauges of exited worker(s) %s", sorted(dead))
    return sorted(dead)


class _Family:
    """A labelled metric with its children cached by label values.

    prometheus-client's ``labels()`` costs ~5 µs (validation, a lock); a dict lookup
    on the tuple ~0.1 µs. The label sets are bounded, so is the cache. Each child is
    handed out wrapped (:class:`_Value`, :class:`_Buckets`): the same values updated
    the same way, without the library's per-call checks that cannot fail here.
    """

    __slots__ = ("_children", "_wrap", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}
        self._wrap = _Buckets if isinstance(metric, Histogram) else _Value

    def child(self, *labels: str) -> Any:
        try:
            return self._children[labels]
        except KeyError:
            child = self._children[labels] = self._wrap(self.metric.labels(*labels))
            return child


class _Value:
    """A counter's or gauge's child: ``inc``/``dec`` straight on its value (which takes
    its lock, or writes the multiprocess file, as the library's own ``inc`` does).
    Amounts are never negative for counters (token counts, ones)."""

    __slots__ = ("_inc", "set")

    def __init__(self, child: Any) -> None:
        self._inc = child._value.inc
        self.set = child.set if hasattr(child, "set") else None

    def inc(self, amount: float = 1.0) -> None:
        self._inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._inc(-amount)


class _Buckets:
    """A histogram's child: ``observe`` adds to the sum and to the one bucket the value
    falls in (prometheus-client keeps buckets uncumulated and sums them at a scrape),
    found by bisection rather than a walk over every bound."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._bounds = list(child._upper_bounds)
        self._buckets = [bucket.inc for bucket in child._buckets]
        self._sum = child._sum.inc

    def observe(self, amount: float) -> None:
        self._sum(amount)
        self._buckets[bisect_left(self._bounds, amount)](1)


class NoMetrics:
    """Metrics turned off: every report is a no-op (what the stages get then)."""

    enabled = False

    def rate_limited(self, key: str, limit: str) -> None:
        """A request refused by a limit (``rpm``, ``tpm``, ``parallel``, ``quota``...)."""

    def upstream_request(self, upstream: str, outcome: str) -> None:
        """One attempt sent to ``upstream`` (its URL without credentials) and its outcome."""

    def upstream_health(self, upstream: str, healthy: bool) -> None:
        """The gateway's current view of ``upstream``'s health."""

    def cache(self, result: str) -> None:
        """One cache lookup: ``hit``, ``miss``, ``bypass`` (or ``replay``)."""


class Metrics(NoMetrics):
    """The gateway's metrics on their own registry (two apps in one process stay apart).

    ``served`` is the set of model names the gateway serves (anything with ``in``; it
    may change as upstreams are discovered); other names are labelled ``other``.
    ``keys`` bounds the ``key`` label to configured names, when given.
    """

    enabled = True

    def __init__(
        self,
        served: Container[str],
        *,
        keys: Container[str] | None = None,
        multiproc_dir: str = "",
    ) -> None:
        self.served = served
        self.keys = keys
        self.multiproc_dir = multiproc_dir
        if multiproc_dir:
            if not is_multiprocess():
                raise ConfigError(
                    "PROMETHEUS_MULTIPROC_DIR: must be in the process environment before "
                    "the gateway starts (not only in a .env file)"
                )
            if not os.path.isdir(multiproc_dir):
                raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR={multiproc_dir!r}: not a directory")
            # Values go to per-process files; a scrape merges them, not this registry.
            self.registry = None
        else:
            self.registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=self.registry)
        reg = self.registry

        def counter(name: str, doc: str, labels: Iterable[str]) -> _Family:
            return _Family(Counter(PREFIX + name, doc, list(labels), registry=reg))

        def histogram(name: str, doc: str, labels: Iterable[str], buckets: tuple) -> _Family:
            metric = Histogram(PREFIX + name, doc, list(labels), registry=reg, buckets=buckets)
            return _Family(metric)

        def gauge(name: str, doc: str, labels: Iterable[str], mode: str) -> _Family:
            metric = Gauge(PREFIX + name, doc, list(labels), registry=reg, multiprocess_mode=mode)
            return _Family(metric)

        self.requests = counter(
            "requests_total",
            "Requests answered, by route template, method, status sent, model and key name.",
            ("route", "method", "status", "model", "key"),
        )
        self.duration = histogram(
            "request_duration_seconds",
            "Request arrival to the end of the response (streams: the last byte).",
            ("route", "model"),
            DURATION_BUCKETS,
        )
        self.ttfb = histogram(
            "time_to_first_byte_seconds",
            "Request arrival to the first response body byte sent to the client.",
            ("route", "model"),
            TTFB_BUCKETS,
        )
        self.overhead = histogram(
            "overhead_seconds",
            "The gateway's own time up to the response headers, minus the time waiting on "
            "the upstream (as Server-Timing); requests that reached the upstream stage.",
            ("route",),
            OVERHEAD_BUCKETS,
        )
        self.inflight = gauge(
            "inflight_requests",
            "Requests being served (summed over live worker processes).",
            ("route",),
            "livesum",
        )
        self.upstream_requests = counter(
            "upstream_requests_total",
            "Attempts sent upstream (retries included), by outcome: 2xx..5xx or the failure.",
            ("upstream", "outcome"),
        )
        self.upstream_healthy = gauge(
            "upstream_healthy",
            "1 when the gateway sees the upstream healthy, else 0 (several workers: the "
            "lowest of the live workers' views).",
            ("upstream",),
            "livemin",
        )
        self.tokens = counter(
            "tokens_total",
            "Tokens of answered requests, from the upstream's usage (streams included).",
            ("model", "key", "kind"),
        )
        self.rate_limited_total = counter(
            "rate_limited_total", "Requests refused by a limit, by key and limit.", ("key", "limit")
        )
        self.client_disconnects = counter(
            "client_disconnects_total",
            "Requests whose client went away before the answer was complete.",
            ("route",),
        )
        self.abort_latency = histogram(
            "abort_latency_seconds",
            "A client disconnect noticed to its upstream request closed (the handler done).",
            ("route",),
            ABORT_BUCKETS,
        )
        self.streams = counter(
            "streams_total",
            "Streamed (text/event-stream) responses by outcome: completed, "
            "client_disconnected, upstream_cut.",
            ("route", "model", "outcome"),
        )
        self.cache_requests = counter(
            "cache_requests_total", "Response cache lookups by result.", ("result",)
        )

    # ---- reports from the other stages (one call each) -------------------------------------

    def rate_limited(self, key: str, limit: str) -> None:
        self.rate_limited_total.child(self._key(key), limit).inc()

    def upstream_request(self, upstream: str, outcome: str) -> None:
        self.upstream_requests.child(upstream, outcome).inc()

    def upstream_health(self, upstream: str, healthy: bool) -> None:
        self.upstream_healthy.child(upstream).set(1 if healthy else 0)

    def cache(self, result: str) -> None:
        self.cache_requests.child(result if result in CACHE_RESULTS else "other").inc()

    # ---- labels ------------------------------------------------------------------------------

    def _key(self, name: str | None) -> str:
        if name is None:
            return "anonymous"
        if self.keys is not None and name not in self.keys and name != "invalid":
            return "other"
        return name

    def model_label(self, info: RequestInfo, method: str) -> str:
        name = info.model
        if name is None and method == "POST" and info.body:
            # No stage named the model: read it from the request (parsed once, shared).
            body = info.json_body(info.body)
            found = body.get("model") if body is not None else None
            if isinstance(found, str):
                name = info.model = found
        if name is None:
            return "none"
        return name if name in self.served else "other"

    # ---- one request -------------------------------------------------------------------------

    def observe(self, info: RequestInfo, route: str, method: str, end: float) -> None:
        """Record one finished request (called once, by :class:`proxy.front.Front`), from
        what its :class:`RequestInfo` says."""
        model = self.model_label(info, method)
        key = self._key(info.key_name)
        complete = info.complete
        disconnected = info.disconnected_at is not None and not complete
        status = info.status or (499 if disconnected else 0)
        self.requests.child(
            route, method if method in METHODS else "other", str(status), model, key
        ).inc()
        started = info.started
        self.duration.child(route, model).observe(end - started)
        if info.first_byte_at is not None:
            self.ttfb.child(route, model).observe(info.first_byte_at - started)
        if info.headers_at is not None and info.upstream_ms is not None:
            own = info.headers_at - started - info.upstream_ms / 1000
            self.overhead.child(route).observe(max(own, 0.0))
        if disconnected:
            self.client_disconnects.child(route).inc()
            assert info.disconnected_at is not None
            self.abort_latency.child(route).observe(max(end - info.disconnected_at, 0.0))
        if _is_stream(info.response_headers):
            outcome = info.outcome or (
                "completed"
                if complete
                else "client_disconnected"
                if disconnected
                else "upstream_cut"
            )
            self.streams.child(route, model, outcome).inc()
        if info.prompt_tokens:
            self.tokens.child(model, key, "prompt").inc(info.prompt_tokens)
        if info.completion_tokens:
            self.tokens.child(model, key, "completion").inc(info.completion_tokens)

    # ---- exposition --------------------------------------------------------------------------

    def scrape(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if ``accept`` asks) and its type."""
        encoder, content_type = choose_encoder(accept or "")
        if self.registry is not None:
            return encoder(self.registry), content_type
        reap_dead_processes(self.multiproc_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)
        return encoder(registry), content_type


def _is_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"text/event-stream")
    return False


class MetricsEndpoint:
    """``GET /metrics``: the exposition, built off the event loop (a big one takes ms).

    Who may read it is auth's business (README, "Metrics"); ``allow`` is a further
    check on the caller's :class:`RequestInfo` (e.g. a key's ``metrics`` flag).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        allow: Callable[[RequestInfo], bool] | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.allow = allow
        self.before = before  # e.g. set the upstreams' health gauges from the router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed("use GET /metrics").send(send, [(b"allow", b"GET, HEAD")])
            return
        if self.allow is not None and not self.allow(request_info(scope)):
            await Forbidden("this API key may not read /metrics").send(send)
            return
        if self.before is not None:
            self.before()
        accept = None
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
        body, content_type = await anyio.to_thread.run_sync(self.metrics.scrape, accept)
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        payload = b"" if scope["method"] == "HEAD" else body
        await send({"type": "http.response.body", "body": payload, "more_body": False})


class UpstreamModels:
    """The model names the gateway serves today: ``VLLM_MODEL`` plus the upstream's list.

    Refreshed at start-up and every ``every`` seconds (the same request also reports
    the upstream's health). A stand-in until routing knows its upstreams' models; any
    container of names does for :class:`Metrics`.
    """

    def __init__(
        self,
        upstream: Upstream,
        default_model: str,
        *,
        on_health: Callable[[str, bool], None] | None = None,
        every: float = 15.0,
    ) -> None:
        self.upstream = upstream
        self.default = default_model
        self.names: frozenset[str] = frozenset({default_model})
        self.on_health = on_health
        self.every = every

    def __contains__(self, name: object) -> bool:
        return name in self.names

    async def refresh(self) -> None:
        ids = await self.upstream.model_ids()
        if ids is not None:
            self.names = frozenset({self.default, *ids})
        if self.on_health is not None:
            self.on_health(self.upstream.label, ids is not None)

    async def run(self) -> None:
        """Refresh forever (a lifespan task; cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.every)
            await self.refresh()


class RouterModels:
    """The model names the gateway serves with a managed router (many upstreams or a
    config file): ``VLLM_MODEL`` plus every model an upstream serves or discovered.
    :meth:`report` copies each upstream's health into the ``upstream_healthy`` gauge."""

    def __init__(
        self, router: Any, default_model: str, on_health: Callable[[str, bool], None]
    ) -> None:
        self.router = router
        self.default = default_model
        self.on_health = on_health

    def __contains__(self, name: object) -> bool:
        if name == self.default:
            return True
        return any(e.models is not None and name in e.models for e in self.router.endpoints)

    def report(self) -> None:
        for e in self.router.endpoints:
            self.on_health(e.upstream.label, e.healthy)


def resolve(settings: Settings, spec: Any = None) -> tuple[bool, bool]:
    """Whether metrics are on and ``/metrics`` public: the environment, then the
    config file's ``[metrics]`` (``spec``), then the defaults (on, not public)."""
    enabled = settings.metrics
    public = settings.metrics_public
    if enabled is None:
        enabled = spec.enabled if spec is not None and spec.enabled is not None else True
    if public is None:
        public = bool(spec is not None and spec.public)
    return enabled, public
