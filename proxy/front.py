"""The outermost per-request stage: request id, in-flight count, access log, metrics.

One wrapper does what three middlewares did (each with its own coroutine frame per
request): it counts the request as in flight (:class:`~proxy.inflight.InFlight`, so
shutdown waits for it), settles its :class:`~proxy.accesslog.RequestInfo` and request
id, records the response's status and times from the messages it passes on (returning
``X-Request-Id`` on every response), and when the request ends writes the access-log
line and the metrics (:meth:`~proxy.metrics.Metrics.observe`; nothing per body chunk).

:class:`Gateway` sends ``/v1/...`` requests through a :class:`Front` of their own
straight to auth and the passthrough, past Starlette's error middleware and router;
that ``Front`` answers an unexpected exception with the gateway's JSON 500 itself.
"""

from __future__ import annotations

import logging
import time

from starlette.applications import Starlette

from proxy.accesslog import log_request, request_info
from proxy.asgi import ASGIApp, Message, Receive, Scope, Send, route_path
from proxy.errors import GatewayError
from proxy.headers import REQUEST_ID
from proxy.inflight import InFlight
from proxy.metrics import Metrics, route_of

log = logging.getLogger(__name__)


class Front:
    """See the module's docstring. ``answer_errors``: answer an exception that escapes
    before the response started with a JSON 500 (where no Starlette error middleware is
    outside); otherwise it propagates (and is logged as a 500)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracker: InFlight,
        access_log: bool = True,
        metrics: Metrics | None = None,
        answer_errors: bool = False,
    ) -> None:
        self.app = app
        self.tracker = tracker
        self.access_log = access_log
        self.metrics = metrics
        self.answer_errors = answer_errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = request_info(scope)
        rid = info.request_id
        sent = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.start":
                info.status = message["status"]
                info.headers_at = time.perf_counter()
                headers = message.setdefault("headers", [])
                if not isinstance(headers, list):
                    headers = message["headers"] = list(headers)
                headers.append((REQUEST_ID, rid))
                info.response_headers = headers
            else:
                chunk = message.get("body", b"")
                if chunk and not sent:
                    info.first_byte_at = time.perf_counter()
                sent += len(chunk)
                if not message.get("more_body", False):
                    info.complete = True
            await send(message)

        tracker = self.tracker
        tracker.enter()
        metrics = self.metrics
        if metrics is not None:
            route = route_of(route_path(scope))
            gauge = metrics.inflight.child(route)
            gauge.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if not info.status:
                info.status = 500
                if self.answer_errors:
                    log.error(
                        "unhandled error on %s %s",
                        scope["method"],
                        scope["path"],
                        exc_info=exc,
                    )
                    await InternalError().send(send_wrapper)
                    return
            raise
        finally:
            tracker.leave()
            if metrics is not None:
                gauge.dec()
                metrics.observe(info, route, scope["method"], time.perf_counter())
            if self.access_log:
                log_request(scope, info, sent)


class InternalError(GatewayError):
    """An exception the gateway did not expect (its log has the traceback)."""

    def __init__(self) -> None:
        super().__init__("internal gateway error; see the gateway log")


class Gateway(Starlette):
    """The gateway's Starlette app, with a lane for ``/v1/...``: such a request goes to
    ``v1`` (a :class:`Front` around auth and the passthrough) without Starlette's error
    middleware, router and exception middleware, which have nothing to decide there
    (bench/RESULTS.md measures what that saves). Everything else is Starlette's."""

    v1: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        v1 = self.v1
        if v1 is not None and scope["type"] == "http" and route_path(scope).startswith("/v1/"):
            await v1(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
