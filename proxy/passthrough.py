"""The ``/v1/*`` relay: request bytes in, upstream raw bytes out, streamed.

Nothing is parsed: the body is buffered once (so a retry can replay it) and
sent upstream as is; the response status, end-to-end headers and body bytes
come back exactly as the upstream sent them, chunk by chunk. If the client
goes away the upstream response is closed at once, which makes vLLM abort
the generation. If the upstream fails after the response started, the
client's connection is cut (no clean end), so the client sees the failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Receive, Scope, Send, route_path
from proxy.body import ClientDisconnected, check_head, read_body, wait_disconnect
from proxy.config import Settings
from proxy.errors import ClientError, UpstreamError
from proxy.exposure import Exposure
from proxy.headers import (
    HeaderList,
    client_response_headers,
    get_header,
    upstream_request_headers,
)
from proxy.retry import RetryPolicy, send_with_retry
from proxy.upstream import Upstream, UpstreamResponse

log = logging.getLogger(__name__)

_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class Relay:
    """Send one buffered request upstream (with retries) and stream the answer to the client."""

    def __init__(self, upstream: Upstream, policy: RetryPolicy, settings: Settings) -> None:
        self.upstream = upstream
        self.policy = policy
        self.api_key = settings.api_key.encode()
        self.max_body = settings.max_body_bytes
        self.body_timeout = settings.body_timeout
        self.max_header_bytes = settings.max_header_bytes

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, *, path: str, query: bytes = b""
    ) -> None:
        info = request_info(scope)
        body = await self.read_request(scope, receive, send, info)
        if body is None:
            return
        headers = upstream_request_headers(
            scope["headers"], api_key=self.api_key, request_id=info.request_id
        )
        url = self.upstream.url(path, query)
        method = scope["method"]

        async def attempt() -> UpstreamResponse:
            info.attempts += 1
            return await self.upstream.send(method, url, headers, body)

        await self.guard(receive, info, lambda: self._exchange(send, attempt, info))

    async def read_request(
        self, scope: Scope, receive: Receive, send: Send, info: RequestInfo
    ) -> bytes | None:
        """The whole request body, or None after answering the client's error (413, 408...)."""
        try:
            check_head(scope, limit=self.max_header_bytes)
            info.body = await read_body(
                scope, receive, limit=self.max_body, timeout=self.body_timeout
            )
            return info.body
        except ClientError as exc:
            await exc.send(send)
        except ClientDisconnected:
            info.note = "client-disconnected"
            info.disconnected_at = time.perf_counter()
        return None

    async def guard(
        self, receive: Receive, info: RequestInfo, exchange: Callable[[], Awaitable[bool]]
    ) -> None:
        """Run ``exchange`` (True when it sent its response completely), cancelling it the
        moment the client disconnects so the upstream request is closed at once.

        A plain task watches for the disconnect and cancels this one; that cancellation is
        absorbed here, any other (server shutdown) propagates, even if both happen at once.
        """
        task = asyncio.current_task()
        assert task is not None
        watching = True
        disconnected = False

        def on_disconnect(watcher: asyncio.Task[None]) -> None:
            nonlocal disconnected
            # ``watching`` is False once ``exchange`` is over: never cancel the task later.
            if watching and not watcher.cancelled() and watcher.exception() is None:
                disconnected = True
                info.disconnected_at = time.perf_counter()
                task.cancel()

        watcher = asyncio.ensure_future(wait_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        completed = False
        try:
            completed = await exchange()
        except asyncio.CancelledError:
            if not disconnected or task.uncancel() > 0:
                raise
        finally:
            watching = False
            watcher.cancel()
        if disconnected and not completed:
            info.note = "client-disconnected"
            log.debug("client disconnected; upstream closed (id=%s)", info.request_id)

    async def open(
        self, attempt: Callable[[], Awaitable[UpstreamResponse]], info: RequestInfo
    ) -> UpstreamResponse:
        """``send_with_retry`` with the upstream time recorded; logs and re-raises failures."""
        start = time.perf_counter()
        try:
            return await send_with_retry(attempt, self.policy)
        except UpstreamError as exc:
            info.note = exc.code or ""
            log.warning("upstream failed: %s (id=%s)", exc.message, info.request_id)
            raise
        finally:
            info.upstream_ms = (time.perf_counter() - start) * 1000

    async def _exchange(
        self,
        send: Send,
        attempt: Callable[[], Awaitable[UpstreamResponse]],
        info: RequestInfo,
    ) -> bool:
        """Returns True when the response was sent completely."""
        try:
            response = await self.open(attempt, info)
        except UpstreamError as exc:
            await exc.send(send)
            return True
        headers = client_response_headers(response.headers)
        if not is_event_stream(headers):
            headers.append(server_timing(info, time.perf_counter()))
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            async for chunk in response.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        except UpstreamError as exc:
            # The status is already sent: end without completing the body so the server
            # closes the connection and the client sees a cut, not a clean (short) answer.
            info.note = f"cut:{exc.code}"
            log.warning("upstream failed mid-response: %s (id=%s)", exc.message, info.request_id)
            return False
        finally:
            await response.aclose()


def is_event_stream(headers: HeaderList) -> bool:
    content_type = get_header(headers, b"content-type")
    return content_type is not None and content_type.startswith(b"text/event-stream")


def server_timing(info: RequestInfo, now: float) -> tuple[bytes, bytes]:
    """``Server-Timing: gateway;dur=MS``: time in the gateway up to the response headers,
    minus the time spent waiting on the upstream (attempts and back-off included)."""
    own = (now - info.started) * 1000 - (info.upstream_ms or 0.0)
    return b"server-timing", b"gateway;dur=%.3f" % max(own, 0.0)


class Passthrough:
    """ASGI app for ``/v1/{path}``: check the path, then relay it to ``{VLLM_BASE_URL}/{path}``."""

    def __init__(self, relay: Relay, exposure: Exposure, *, prefix: str = "/v1") -> None:
        self.relay = relay
        self.exposure = exposure
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = route_path(scope)[len(self.prefix) :]
        problem = self.exposure.check(scope["method"], sub)
        if problem is not None:
            await problem.send(send)
            return
        path = quote(sub, safe=_PATH_SAFE)
        await self.relay(scope, receive, send, path=path, query=scope["query_string"])
