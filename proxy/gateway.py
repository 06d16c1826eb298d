"""``create_app()``: routes, middleware order, lifespan.

Middleware, outermost first: :class:`~proxy.front.Front` (in-flight count, which the
lifespan shutdown waits for; request id; one access-log line; metrics when on) → CORS
(only when ``VLLM_WRAPPER_CORS_ORIGINS`` is set) → bearer auth → routes. All are pure
ASGI, so streamed bodies pass through untouched. ``/v1/*``, the hot path, goes through
the same stages straight to the passthrough app (:class:`~proxy.front.Gateway`);
everything else through Starlette's error middleware, exception middleware and router.

Mounted inside another app (``Mount("/llm", app=gateway)``) the gateway gets
no lifespan events of its own; the host runs them with :func:`lifespan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable, Container
from contextlib import AbstractAsyncContextManager

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from proxy.asgi import ASGIApp, Receive, Scope, Send, route_path
from proxy.auth import BearerAuthMiddleware
from proxy.cache import CacheSpec, ChatCache, ResponseCache, Responses
from proxy.chat import Chat, ChatCore
from proxy.config import Settings
from proxy.configfile import FileConfig, load
from proxy.conversations import Conversations
from proxy.docs import ASSET_PREFIX, PUBLIC_PATHS, Docs
from proxy.errors import MethodNotAllowed, NotFound, error_body, send_json
from proxy.exposure import Exposure
from proxy.front import Front, Gateway
from proxy.health import Health, Models
from proxy.history import Fitter, History, HistorySpec
from proxy.idempotency import Idempotency
from proxy.inflight import InFlight
from proxy.keys import Keys
from proxy.limits import Limiter, UsageEndpoint
from proxy.logs import ensure_gateway_logging
from proxy.metrics import (
    Metrics,
    MetricsEndpoint,
    NoMetrics,
    RouterModels,
    UpstreamModels,
)
from proxy.metrics import resolve as resolve_metrics
from proxy.passthrough import Passthrough, Relay, RootRoute
from proxy.playground import PATH as PLAYGROUND
from proxy.playground import PUBLIC_PATHS as PLAYGROUND_PATHS
from proxy.playground import Playground
from proxy.reload import AdminReload, Reloader
from proxy.retry import RetryPolicy
from proxy.routing.router import Router, upstream_specs
from proxy.startup import base_url_warning
from proxy.state import StateSpec, open_state
from proxy.state.memory import MemoryState
from proxy.version import VERSION
from proxy.ws import ChatSocket

log = logging.getLogger(__name__)

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error"}


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, str(status))
    return Response(
        error_body(message, kind, code),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {
        404: f"no route for {request.method} {request.url.path}",
        405: f"method {request.method} not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return _json_error(exc.status_code, message, exc.headers)


class Index:
    """``GET /``: what this server is and where to look (no secrets, no upstream address).
    Links follow a mount prefix (``root_path``)."""

    def __init__(self, docs: bool) -> None:
        links = {"health": "/health", "models": "/models", "chat": "/chat", "openai": "/v1"}
        if docs:
            links = {"docs": "/docs", "openapi": "/openapi.json", **links}
        self.links = links
        self.body = self._body("")

    def _body(self, prefix: str) -> bytes:
        links = {name: prefix + path for name, path in self.links.items()}
        return orjson.dumps({"name": "vllm-wrapper", "version": VERSION, "links": links})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed("use GET /").send(send, [(b"allow", b"GET, HEAD")])
            return
        prefix = scope.get("root_path", "").rstrip("/")
        await send_json(send, 200, self._body(prefix) if prefix else self.body)


class MissingV1:
    """An OpenAI SDK whose base URL lacks ``/v1`` calls ``/chat/completions`` etc. here."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await NotFound(
            f"no route for {route_path(scope)}: the OpenAI API is under /v1 — add /v1 to your "
            "client's base URL (e.g. base_url='http://host:8001/v1'), or use POST /chat for "
            "the simple API"
        ).send(send)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json_error(500, "internal gateway error; see the gateway log")


def lifespan(gateway: Starlette) -> AbstractAsyncContextManager[None]:
    """The gateway's lifespan (its upstream connection pool), for a host app that mounts it.

    Enter it inside the host's own lifespan::

        gateway = create_app()

        @contextlib.asynccontextmanager
        async def host_lifespan(app):
            async with proxy.lifespan(gateway):
                yield

        app = Starlette(routes=[Mount("/llm", app=gateway)], lifespan=host_lifespan)
    """
    return gateway.router.lifespan_context(gateway)


def state_spec(settings: Settings, config: FileConfig) -> StateSpec:
    """``[state]``, with ``VLLM_WRAPPER_REDIS_URL`` winning over the file."""
    spec = config.state or StateSpec()
    if settings.redis_url:
        spec = dataclasses.replace(spec, backend="redis", redis_url=settings.redis_url)
    return spec


def build_responses(
    settings: Settings,
    spec: CacheSpec,
    state: StateSpec,
    on_result: Callable[[str], None] | None = None,
) -> Responses | None:
    """The cache-and-idempotency stage, or None when both are off (then it costs nothing).

    The cache lives in this process's memory (an LRU bounded by ``[cache] max_bytes``)
    unless the state is Redis, which then holds it for every gateway (bounded by
    ``ttl``); idempotency records live in the ``[state]`` backend, so ``--workers`` and
    replicas sharing it see each other's keys.
    """
    if not spec.enabled and not spec.idempotency:
        return None
    redis = state.backend == "redis" or (not state.backend and bool(state.redis_url))
    shared = open_state(state) if redis or spec.idempotency else None
    cache = None
    if spec.enabled:
        store = shared if redis and shared is not None else MemoryState(max_bytes=spec.max_bytes)
        cache = ResponseCache(spec, store)
    idempotency = None
    if spec.idempotency and shared is not None:
        idempotency = Idempotency(shared, ttl=spec.idempotency_ttl, lease=spec.idempotency_lease)
    return Responses(
        spec,
        cache,
        idempotency,
        default_model=settings.model,
        chat_temperature=settings.default_temperature,
        states=(shared,) if shared is not None else (),
        on_result=on_result,
    )


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(
    settings: Settings | None = None,
    config: FileConfig | None = None,
    *,
    reload_fan_out: Callable[[], None] | None = None,
    served_models: Container[str] | None = None,
) -> Starlette:
    """Build the gateway from ``settings`` (default: from the environment and ``.env``).

    ``config`` is the configuration file's content; when None and ``settings.config_path``
    is set, the file is read here (a bad one raises :class:`ConfigError`, one line).
    ``reload_fan_out`` (``--workers N``) makes ``POST /admin/reload`` reload every worker.
    ``served_models``: the model names the metrics may show as ``model`` labels (default:
    ``VLLM_MODEL`` and what the upstreams serve, refreshed in the background).
    """
    if settings is None:
        ensure_gateway_logging()  # before reading the environment, which may warn
        settings = Settings.from_env()
    ensure_gateway_logging(settings.log_level)
    warning = base_url_warning(settings)
    if warning:
        log.warning("%s", warning)
    if config is None and settings.config_path:
        config = load(settings.config_path)
    file_config = config or FileConfig()
    keys = Keys.build(settings.wrapper_api_key, file_config.keys, file_config.limits)
    shared = state_spec(settings, file_config)
    limiter = Limiter(keys, shared)
    metrics_on, metrics_public = resolve_metrics(settings, file_config.metrics)
    metrics: Metrics | NoMetrics = NoMetrics()
    if metrics_on:
        metrics = Metrics(frozenset({settings.model}), multiproc_dir=settings.metrics_dir)
    responses = build_responses(
        settings, file_config.cache or CacheSpec(), shared, metrics.cache if metrics_on else None
    )
    router = Router(
        settings,
        upstream_specs(settings, config),
        config.routing if config is not None else None,
        managed=config is not None,
        observe=metrics.upstream_request if metrics_on else None,
    )
    discovered: UpstreamModels | None = None
    if isinstance(metrics, Metrics):
        if served_models is not None:
            metrics.served = served_models
        elif router.managed:  # the router discovers and checks every upstream itself
            metrics.served = RouterModels(router, settings.model, metrics.upstream_health)
        else:
            upstream = router.endpoints[0].upstream
            discovered = UpstreamModels(upstream, settings.model, on_health=metrics.upstream_health)
            metrics.served = discovered
    reloader = None
    if config is not None and config.path:
        reloader = Reloader(config.path)
        reloader.register(router.prepare)
        reloader.register(functools.partial(keys.prepare, settings.wrapper_api_key))
    relay = Relay(
        router,
        RetryPolicy.from_settings(settings),
        settings,
        limiter,
        meter=metrics_on,
        responses=responses,
    )
    history = History(file_config.history or HistorySpec(), shared, Fitter(router))
    exposure = Exposure(
        settings.extra_paths, proxy_all=settings.proxy_all, allow_admin=settings.allow_admin
    )
    passthrough = Passthrough(relay, exposure)
    chat = ChatCore(relay, settings, history)
    conversations = Conversations(history, relay)
    chat_socket = ChatSocket(chat, settings, keys)
    chat_http: ASGIApp = Chat(chat)
    if responses is not None:
        chat_http = ChatCache(chat_http, responses, relay)

    routes = [
        Route("/", Index(settings.docs)),
        Route("/health", Health(router, settings)),
        Route("/models", Models(relay)),
        Route("/chat", chat_http),
        WebSocketRoute("/chat/ws", chat_socket),
        Route("/chat/ws", chat_socket),  # plain HTTP: 426 with a hint
        Route("/conversations", conversations),
        Route("/conversations/{conversation_id}", conversations),
        Route("/usage", UsageEndpoint(keys, limiter)),
        Route(
            "/admin/reload",
            AdminReload(reloader, auth_on=bool(keys.ring), fan_out=reload_fan_out),
        ),
        Route("/tokenize", RootRoute(relay, "/tokenize")),
        Route("/detokenize", RootRoute(relay, "/detokenize")),
        # /v1/... takes the v1 lane (front.Gateway); bare /v1 gets our 404, not a redirect.
        Route("/v1", passthrough),
        # The OpenAI API's own paths without the /v1: a client's base URL lacks it.
        *(Route(p, MissingV1()) for p in ("/chat/completions", "/completions", "/embeddings")),
    ]
    public = ["/", "/health"]  # the index names no secret, like /health
    if settings.docs:
        docs = Docs(settings)
        routes += [
            Route("/docs", docs),
            Route("/openapi.json", docs),
            Route(ASSET_PREFIX + "{name}", docs),
        ]
        # The docs describe the API without calling it; a browser cannot send a bearer
        # header to open a page, so they are public (README, "API docs").
        public += PUBLIC_PATHS
    if settings.playground:
        playground = Playground()
        routes += [Route(PLAYGROUND, playground), Route(PLAYGROUND + "/{name}", playground)]
        # Like the docs, the page itself calls nothing; it asks for the key to chat.
        public += PLAYGROUND_PATHS
    if isinstance(metrics, Metrics):
        endpoint = MetricsEndpoint(
            metrics,
            # With auth on, an admin key or one with ``metrics = true`` (unless public).
            allow=lambda info: info.key is None or info.key.admin or info.key.metrics,
            before=metrics.served.report if isinstance(metrics.served, RouterModels) else None,
        )
        routes.append(Route("/metrics", endpoint))
        if metrics_public:
            public.append("/metrics")

    inflight = InFlight()
    front = functools.partial(
        Front,
        tracker=inflight,
        access_log=settings.access_log,
        metrics=metrics if isinstance(metrics, Metrics) else None,
    )
    guards: list[Middleware] = []
    if settings.cors_origins:
        guards.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "x-conversation-id"],
            )
        )
    guards.append(
        Middleware(BearerAuthMiddleware, keys=keys, exempt=public, message_auth=["/chat/ws"])
    )
    middleware = [Middleware(front), *guards]
    # /v1/...: the same stages around the passthrough, past Starlette (front.Gateway).
    v1: ASGIApp = passthrough
    for cls, args, kwargs in reversed(guards):
        v1 = cls(v1, *args, **kwargs)
    v1 = front(v1, answer_errors=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with router, contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(limiter.aclose)
            stack.push_async_callback(history.aclose)
            if responses is not None:
                stack.push_async_callback(responses.aclose)
            if reloader is not None:
                await stack.enter_async_context(reloader.on_sighup())
            if discovered is not None:
                await discovered.refresh()  # bounded by VLLM_WRAPPER_HEALTH_TIMEOUT
                refresher = asyncio.create_task(discovered.run())
                stack.push_async_callback(_stop, refresher)
            yield
            # Requests the server has not finished (or has just cancelled) end first.
            await inflight.wait_idle(settings.graceful_timeout)

    app = Gateway(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.v1 = v1
    app.state.settings = settings  # for introspection only; handlers get theirs passed in
    app.state.upstream = router.endpoints[0].upstream
    app.state.router = router
    app.state.keys = keys
    app.state.limiter = limiter
    return app
