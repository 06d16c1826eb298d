"""Per-request context and the one-line access log.

:class:`AccessLogMiddleware` is the outermost wrapper: it settles the request
id (the client's ``X-Request-Id`` if sane, else a new one), returns it on every
response, and logs one line when the request ends::

    POST /v1/chat/completions 200 upstream=12.3ms bytes=4567 dur=812.0ms id=ab12...

Bodies and the ``authorization`` header are never logged.
"""

from __future__ import annotations

import logging
import time

from proxy.asgi import ASGIApp, Message, Receive, Scope, Send
from proxy.headers import REQUEST_ID, request_id_from

log = logging.getLogger("proxy.access")

SCOPE_KEY = "vllm_wrapper.request"


class RequestInfo:
    """What handlers record about a request for its log line."""

    __slots__ = ("attempts", "note", "request_id", "started", "upstream_ms")

    def __init__(self, request_id: bytes) -> None:
        self.started = time.perf_counter()
        self.request_id = request_id
        self.upstream_ms: float | None = None
        self.attempts = 0
        self.note = ""

    @property
    def id_text(self) -> str:
        """The request id as text, for log lines (``id=abc``, never ``id=b'abc'``)."""
        return self.request_id.decode("latin-1")


def request_info(scope: Scope) -> RequestInfo:
    """The request's :class:`RequestInfo`, created on first use (e.g. when mounted bare)."""
    info: RequestInfo | None = scope.get(SCOPE_KEY)
    if info is None:
        info = RequestInfo(request_id_from(scope.get("headers", ())))
        scope[SCOPE_KEY] = info
    return info


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, *, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = request_info(scope)
        rid = info.request_id
        start = time.perf_counter()
        status = 0
        sent = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                if not isinstance(headers, list):
                    headers = message["headers"] = list(headers)
                headers.append((REQUEST_ID, rid))
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if self.enabled and log.isEnabledFor(logging.INFO):
                dur = (time.perf_counter() - start) * 1000
                up = f"{info.upstream_ms:.1f}ms" if info.upstream_ms is not None else "-"
                log.info(
                    "%s %s %s upstream=%s bytes=%d dur=%.1fms attempts=%d id=%s%s",
                    scope["method"],
                    scope["path"],
                    status or "-",
                    up,
                    sent,
                    dur,
                    info.attempts,
                    info.id_text,
                    f" {info.note}" if info.note else "",
                )
