"""``create_app()``: routes, middleware order, lifespan.

Middleware, outermost first: in-flight count (the lifespan shutdown waits for
it) → access log (request id, one line per request) → CORS (only when
``VLLM_WRAPPER_CORS_ORIGINS`` is set) → bearer auth → :class:`V1Lane` → routes. All
are pure ASGI, so streamed bodies pass through untouched. ``/v1/*``, the hot path,
goes from the lane straight to the passthrough app; everything else through
Starlette's exception middleware and router.

Mounted inside another app (``Mount("/llm", app=gateway)``) the gateway gets
no lifespan events of its own; the host runs them with :func:`lifespan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.accesslog import AccessLogMiddleware
from proxy.asgi import ASGIApp, Receive, Scope, Send, route_path
from proxy.auth import BearerAuthMiddleware
from proxy.chat import Chat
from proxy.config import Settings
from proxy.configfile import FileConfig, load
from proxy.conversations import Conversations
from proxy.docs import ASSET_PREFIX, PUBLIC_PATHS, Docs
from proxy.errors import error_body
from proxy.exposure import Exposure
from proxy.health import Health, Models
from proxy.history import Fitter, History, HistorySpec
from proxy.inflight import InFlight, InFlightMiddleware
from proxy.keys import Keys
from proxy.limits import Limiter, UsageEndpoint
from proxy.passthrough import Passthrough, Relay
from proxy.retry import RetryPolicy
from proxy.state import StateSpec
from proxy.upstream import Upstream

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


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json_error(500, "internal gateway error; see the gateway log")


class V1Lane:
    """Innermost middleware: ``/v1/*`` requests go straight to ``v1``, the rest to the router.

    Every ``/v1/...`` path belongs to the passthrough, so Starlette's router (a regex per
    route, a scope copy) and exception middleware (two wrappers per message) have nothing
    to decide there; skipping them is a measured part of the per-request CPU
    (bench/RESULTS.md). The middlewares outside this one, and Starlette's server-error
    handler outermost, still apply.
    """

    def __init__(self, app: ASGIApp, *, v1: ASGIApp, prefix: str = "/v1/") -> None:
        self.app = app
        self.v1 = v1
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope).startswith(self.prefix):
            await self.v1(scope, receive, send)
        else:
            await self.app(scope, receive, send)


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


def create_app(settings: Settings | None = None, config: FileConfig | None = None) -> Starlette:
    """Build the gateway from ``settings`` (default: from the environment and ``.env``)
    and the configuration file (``config``, else the file ``settings.config_path`` names)."""
    if settings is None:
        settings = Settings.from_env()
    if config is None:
        config = load(settings.config_path) if settings.config_path else FileConfig()
    keys = Keys.build(settings.wrapper_api_key, config.keys, config.limits)
    shared = state_spec(settings, config)
    limiter = Limiter(keys, shared)
    upstream = Upstream(settings)
    relay = Relay(upstream, RetryPolicy.from_settings(settings), settings, limiter)
    history = History(config.history or HistorySpec(), shared, Fitter(upstream, relay.api_key))
    conversations = Conversations(history, relay)
    exposure = Exposure(
        settings.extra_paths, proxy_all=settings.proxy_all, allow_admin=settings.allow_admin
    )
    passthrough = Passthrough(relay, exposure)

    routes = [
        Route("/health", Health(upstream, settings)),
        Route("/models", Models(relay)),
        Route("/chat", Chat(relay, settings, history)),
        Route("/conversations", conversations),
        Route("/conversations/{conversation_id}", conversations),
        Route("/usage", UsageEndpoint(keys, limiter)),
        # /v1/... goes through V1Lane below; bare /v1 gets a 404 of ours, not a redirect.
        Route("/v1", passthrough),
    ]
    public = ["/health"]
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

    inflight = InFlight()
    middleware = [
        Middleware(InFlightMiddleware, tracker=inflight),
        Middleware(AccessLogMiddleware, enabled=settings.access_log),
    ]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "x-conversation-id"],
            )
        )
    middleware += [
        Middleware(BearerAuthMiddleware, keys=keys, exempt=public),
        Middleware(V1Lane, v1=passthrough),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with upstream:
            try:
                yield
                # Requests the server has not finished (or has just cancelled) end first.
                await inflight.wait_idle(settings.graceful_timeout)
            finally:
                await limiter.aclose()
                await history.aclose()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.settings = settings  # for introspection only; handlers get theirs passed in
    app.state.upstream = upstream
    app.state.keys = keys  # reload: keys.apply(settings.wrapper_api_key, new_config)
    app.state.limiter = limiter
    return app
