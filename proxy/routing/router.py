"""The set of upstreams a request can go to: model routing, balancing, failover, probes, reload.

A request's :class:`Dispatch` picks an endpoint per attempt: the retry loop of
:mod:`proxy.retry` calls :meth:`Dispatch.send` again on a retryable failure, and the
next pick avoids the endpoints already tried when another is available, so a retry is
a failover. In-flight counts last until the response is closed (:meth:`Dispatch.release`).

With one upstream (the plain ``VLLM_BASE_URL`` case) nothing is read from the body,
nothing runs in the background, and ``/v1/models`` stays the upstream's own answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import orjson

from proxy.accesslog import RequestInfo
from proxy.config import ConfigError, Settings
from proxy.configfile import FileConfig, RoutingSpec, UpstreamSpec
from proxy.errors import ModelNotFound, PoolExhausted, UpstreamError, UpstreamUnavailable
from proxy.headers import HeaderList, get_header
from proxy.routing.endpoint import Endpoint, Load
from proxy.routing.policies import Policy, make_policy
from proxy.routing.vllmmetrics import read_gauges
from proxy.upstream import Upstream, UpstreamResponse

log = logging.getLogger(__name__)


def upstream_specs(settings: Settings, config: FileConfig | None) -> tuple[UpstreamSpec, ...]:
    """The file's ``[[upstreams]]`` when it has any, else one per ``VLLM_BASE_URL`` URL."""
    if config is not None and config.upstreams:
        return config.upstreams
    return tuple(UpstreamSpec(url=url) for url in settings.base_urls)


def _client_key(spec: UpstreamSpec) -> tuple[str, str | None, int | None]:
    return spec.url, spec.api_key, spec.max_connections


class Dispatch:
    """One request's way through the upstreams (see the module docstring)."""

    __slots__ = ("candidates", "current", "info", "key", "model", "router", "tried", "version")

    def __init__(
        self,
        router: Router,
        candidates: Sequence[Endpoint],
        key: str | None,
        info: RequestInfo,
        model: str | None = None,
    ) -> None:
        self.router = router
        self.candidates = candidates
        self.key = key
        self.info = info
        self.model = model
        self.version = router.version
        self.current: Endpoint | None = None
        self.tried: list[Endpoint] = []

    async def send(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: HeaderList,
        body: bytes,
        *,
        root: bool = False,
    ) -> UpstreamResponse:
        """One attempt on the endpoint the policy picks now; records its outcome.

        ``root``: ``path`` is relative to the server's root, not to its base URL (``/v1``)."""
        if self.version != self.router.version:  # a reload since the last attempt
            self.version = self.router.version
            try:
                self.candidates = self.router.candidates(self.model)
            except ModelNotFound as exc:
                raise UpstreamUnavailable(f"{exc.message} (since a reload)") from None
        ep = self.router.pick(self.candidates, self.key, self.tried)
        self.release()
        ep.in_flight += 1
        self.current = ep
        self.tried.append(ep)
        if not self.router.single:
            self.info.upstream = ep.url
        upstream = ep.upstream
        try:
            url = upstream.url(path, query, root=root)
            response = await upstream.send(method, url, headers, body)
        except PoolExhausted:
            raise  # our own limit, not the upstream's fault
        except UpstreamError as exc:
            self._failed(ep, exc.message)
            raise
        if response.status >= 500:
            self._failed(ep, f"answered {response.status}")
        elif ep.failures or not ep.healthy:
            ep.succeeded()
        return response

    def _failed(self, ep: Endpoint, reason: str) -> None:
        if ep.failed(reason) and not self.router.single:
            log.warning(
                "upstream %s out of rotation for %.1fs after %d failure(s): %s",
                ep.url,
                ep.down_until - time.monotonic(),
                ep.failures,
                reason,
            )

    def release(self) -> None:
        """The current attempt's response is closed (or was never opened)."""
        ep = self.current
        if ep is not None:
            self.current = None
            ep.in_flight -= 1
            ep.trial = False  # a trial that ended without a verdict (cancelled) may go again


class Router:
    """Every upstream endpoint, which models each serves, the policy, and their health."""

    def __init__(
        self,
        settings: Settings,
        specs: Sequence[UpstreamSpec],
        rules: RoutingSpec | None = None,
        *,
        managed: bool = False,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        """``managed``: probe, discover and reload even with one upstream (a config file).
        ``observe(upstream, outcome)`` hears every attempt (metrics)."""
        self.settings = settings
        self.observe = observe
        self.rules = rules or RoutingSpec()
        self.default_model = settings.model
        self.endpoints = [self._endpoint(s, self.rules) for s in specs]
        self.policy: Policy = make_policy(self.rules.policy, stale=self.rules.metrics_stale)
        self.managed = managed or len(self.endpoints) > 1
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._open = False
        self.version = 0  # bumped by each reload
        self._reindex()

    @classmethod
    def around(cls, upstream: Upstream, settings: Settings) -> Router:
        """A router over one existing :class:`Upstream` (tests, embedding)."""
        router = cls(settings, ())
        router.endpoints = [Endpoint(upstream, UpstreamSpec(url=upstream.base_url), router.rules)]
        router._reindex()
        return router

    def _endpoint(self, spec: UpstreamSpec, rules: RoutingSpec) -> Endpoint:
        upstream = Upstream(
            self.settings,
            url=spec.url,
            api_key=spec.api_key,
            max_connections=spec.max_connections,
            observe=self.observe,
        )
        return Endpoint(upstream, spec, rules)

    def _reindex(self) -> None:
        by_model: dict[str, list[Endpoint]] = {}
        wildcard: list[Endpoint] = []
        for e in self.endpoints:
            if e.models is None:
                wildcard.append(e)
            else:
                for m in e.models:
                    by_model.setdefault(m, []).append(e)
        self.all: tuple[Endpoint, ...] = tuple(self.endpoints)
        self.wildcard = tuple(wildcard)
        self.by_model = {m: tuple(eps) + self.wildcard for m, eps in by_model.items()}
        self.single = len(self.endpoints) == 1
        # Read the body's model only when it can change where the request goes.
        self.route_by_model = not self.single and (len(by_model) > 1 or bool(by_model and wildcard))
        self.session_header = self.rules.session_header.encode()
        self.session_user = self.rules.policy == "session" and self.rules.session_user

    # ---- per request -------------------------------------------------------------------

    def route(self, headers: HeaderList, body: bytes, info: RequestInfo) -> Dispatch:
        """The dispatch for a ``/v1/*`` request. Raises :class:`ModelNotFound`."""
        if self.single:
            return Dispatch(self, self.all, None, info)
        data = None
        if self.route_by_model or self.session_user:
            data = info.json_body(body)
        model = data.get("model") if data is not None else None
        user = data.get("user") if data is not None else None
        return self.dispatch(
            model if isinstance(model, str) else None,
            self.session_key(headers, user),
            info,
        )

    def session_key(self, headers: HeaderList, user: object) -> str | None:
        """The session id (the configured header, else the OpenAI ``user`` field)."""
        if self.rules.policy != "session":
            return None
        value = get_header(headers, self.session_header)
        if value:
            return value.decode("latin-1")
        if self.session_user and isinstance(user, str) and user:
            return "user:" + user
        return None

    def dispatch(self, model: str | None, key: str | None, info: RequestInfo) -> Dispatch:
        return Dispatch(self, self.candidates(model), key, info, model)

    def candidates(self, model: str | None) -> Sequence[Endpoint]:
        if not self.route_by_model:
            return self.all
        if model is None:
            return self.by_model.get(self.default_model, self.all)
        eps = self.by_model.get(model)
        if eps is not None:
            return eps
        if self.wildcard:
            return self.wildcard
        raise ModelNotFound(f"The model `{model}` does not exist.", param="model")

    def pick(
        self, candidates: Sequence[Endpoint], key: str | None, tried: list[Endpoint]
    ) -> Endpoint:
        if len(candidates) == 1:
            ep = candidates[0]
        else:
            now = time.monotonic()
            available = [e for e in candidates if e.available(now) and e not in tried]
            if not available:
                available = [e for e in candidates if e.available(now)]
            if available:
                ep = self.policy(available, key, now)
            else:  # never none for errors alone: the least recently failed one
                live = [e for e in candidates if not e.retired] or candidates
                ep = min(live, key=lambda e: e.last_failure)
        if not ep.healthy:
            ep.trial = True
        return ep

    # ---- models ------------------------------------------------------------------------

    def served_models(self) -> list[dict[str, Any]]:
        """The union of the healthy upstreams' model objects (vLLM's shape), first seen wins."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        now = int(time.time())
        for e in self.endpoints:
            if not e.healthy:
                continue
            names = e.models if e.models is not None else e.model_objects.keys()
            for name in sorted(names):
                if name in seen:
                    continue
                seen.add(name)
                out.append(e.model_objects.get(name) or _model_object(name, now))
        return out

    def serves_default(self) -> bool:
        return any(e.healthy and e.serves(self.default_model) for e in self.endpoints)

    # ---- health and discovery ------------------------------------------------------------

    async def check_all(self) -> None:
        """Probe every upstream's ``/health`` now (and discover models where needed)."""
        await asyncio.gather(*(self.check(e) for e in self.endpoints))

    async def check(self, e: Endpoint) -> None:
        upstream = e.upstream
        try:
            status, _ = await upstream.fetch(upstream.root_url + "/health")
            reason = "" if status == 200 else f"/health answered {status}"
        except UpstreamError as exc:
            reason = exc.message
        if reason:
            if e.healthy:
                log.warning("upstream %s out of rotation: %s", e.url, reason)
            e.probe_failed(reason)
            return
        came_back = not e.healthy and time.monotonic() >= e.down_until
        if came_back:
            e.rejoin()
            log.info("upstream %s back in rotation", e.url)
        if came_back or not e.model_objects:
            await self.discover(e)

    async def discover(self, e: Endpoint) -> None:
        """Learn what ``e`` serves from its ``/v1/models`` (its listed objects, for the union)."""
        upstream = e.upstream
        try:
            status, body = await upstream.fetch(upstream.url("/models"))
            data = orjson.loads(body)["data"] if status == 200 else None
        except UpstreamError as exc:
            e.last_error = exc.message
            return
        except (orjson.JSONDecodeError, KeyError, TypeError):
            data = None
        if not isinstance(data, list):
            log.warning("upstream %s: no usable model list from /models", e.url)
            return
        objects = {d["id"]: d for d in data if isinstance(d, dict) and isinstance(d.get("id"), str)}
        e.model_objects = objects
        if not e.spec.models:
            e.models = frozenset(objects)
        self._reindex()

    async def scrape_all(self) -> None:
        """Read each upstream's vLLM queue figures (load-aware policy only)."""
        if self.rules.policy == "load-aware" and not self.single:
            await asyncio.gather(*(self.scrape(e) for e in self.endpoints))

    async def scrape(self, e: Endpoint) -> None:
        try:
            status, body = await e.upstream.fetch(e.upstream.root_url + "/metrics")
        except UpstreamError:
            return
        gauges = read_gauges(body) if status == 200 else None
        if gauges is not None:
            e.load = Load(
                gauges["waiting"], gauges["running"], gauges["kv_cache"], time.monotonic()
            )

    async def _every(
        self, interval: Callable[[], float], step: Callable[[], Awaitable[None]]
    ) -> None:
        while True:
            await asyncio.sleep(interval())
            try:
                await step()
            except Exception:  # the background boundary: log, keep checking
                log.exception("upstream check failed")

    # ---- lifespan ------------------------------------------------------------------------

    async def __aenter__(self) -> Router:
        for e in self.endpoints:
            await e.upstream.__aenter__()
        self._open = True
        if self.managed:
            if not self.single:
                await self.check_all()
            self._tasks = [
                asyncio.create_task(self._every(lambda: self.rules.probe_interval, self._probe)),
                asyncio.create_task(
                    self._every(lambda: self.rules.metrics_interval, self.scrape_all)
                ),
            ]
        return self

    async def _probe(self) -> None:
        if not self.single:
            await self.check_all()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self._open = False
        for task in [*self._tasks, *self._retiring]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._retiring, return_exceptions=True)
        self._tasks = []
        self._retiring.clear()
        for e in self.endpoints:
            await e.upstream.__aexit__()

    # ---- reload --------------------------------------------------------------------------

    def prepare(self, config: FileConfig) -> Callable[[], Awaitable[None]]:
        """Check a reloaded file's upstreams (raises :class:`ConfigError`, changing nothing);
        return the step that switches to them."""
        rules = config.routing or RoutingSpec()
        specs = upstream_specs(self.settings, config)
        kept = {_client_key(e.spec): e for e in self.endpoints}
        plan: list[tuple[UpstreamSpec, Endpoint | None]] = []
        fresh: dict[int, Endpoint] = {}
        for i, spec in enumerate(specs):
            old = kept.get(_client_key(spec))
            plan.append((spec, old))
            if old is None:
                fresh[i] = self._endpoint(spec, rules)  # may raise ConfigError
        if not specs:
            raise ConfigError(f"{config.path}: upstreams: no upstream left")

        async def commit() -> None:
            endpoints: list[Endpoint] = []
            for i, (spec, old) in enumerate(plan):
                if old is not None:
                    old.update(spec, rules)
                    endpoints.append(old)
                else:
                    e = fresh[i]
                    if self._open:
                        await e.upstream.__aenter__()
                    endpoints.append(e)
            removed = [e for e in self.endpoints if e not in endpoints]
            self.rules = rules
            self.policy = make_policy(rules.policy, stale=rules.metrics_stale)
            self.endpoints = endpoints
            self.managed = True
            self.version += 1
            self._reindex()
            for e in removed:
                self._retire(e)
            log.info(
                "upstreams now: %s (policy %s)", ", ".join(e.url for e in endpoints), rules.policy
            )
            if self._open:
                await asyncio.gather(*(self.check(e) for e in endpoints if e in fresh.values()))

        return commit

    def _retire(self, e: Endpoint) -> None:
        """Out of rotation now; its client closes once its requests in flight have ended."""
        e.retired = True
        if not self._open:
            return

        async def close_when_idle() -> None:
            deadline = time.monotonic() + self.settings.graceful_timeout
            while e.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await e.upstream.__aexit__()
            log.info("upstream %s removed", e.url)

        task = asyncio.create_task(close_when_idle())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def _model_object(name: str, created: int) -> dict[str, Any]:
    """A model entry in vLLM's ``/v1/models`` shape, for a configured model not listed."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": name,
        "parent": None,
        "max_model_len": None,
        "permission": [],
    }


def public_urls(endpoints: Iterable[Endpoint]) -> str:
    return ",".join(e.url for e in endpoints)
