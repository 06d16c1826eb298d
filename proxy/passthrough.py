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
from typing import Any
from urllib.parse import quote

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Receive, Scope, Send, route_path
from proxy.body import (
    ClientDisconnected,
    check_head,
    on_disconnect,
    read_body,
    wait_disconnect,
)
from proxy.cache import Responses, Stored
from proxy.config import Settings
from proxy.errors import (
    ClientError,
    GatewayError,
    MethodNotAllowed,
    UpstreamAuthRefused,
    UpstreamError,
    UpstreamProtocolError,
)
from proxy.exposure import ROOT_PATHS, Exposure
from proxy.headers import (
    HeaderList,
    client_response_headers,
    get_header,
    upstream_request_headers,
    writable,
)
from proxy.limits import Limiter, Ticket
from proxy.retry import RetryPolicy, send_with_retry
from proxy.routing.catalog import send_catalog
from proxy.routing.router import Router
from proxy.upstream import Upstream, UpstreamResponse
from proxy.usage import Meter

log = logging.getLogger(__name__)

_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class Relay:
    """Send one buffered request upstream (with retries) and stream the answer to the client."""

    def __init__(
        self,
        router: Router | Upstream,
        policy: RetryPolicy,
        settings: Settings,
        limiter: Limiter | None = None,
        *,
        meter: bool = False,
        responses: Responses | None = None,
    ) -> None:
        """``meter``: read every answer's usage (a copy of its tail) for the metrics, even
        for a key without token limits."""
        if isinstance(router, Upstream):
            router = Router.around(router, settings)
        self.router = router
        self.policy = policy
        self.limiter = limiter
        self.meter = meter
        self.responses = responses
        self.max_body = settings.max_body_bytes
        self.body_timeout = settings.body_timeout
        self.max_header_bytes = settings.max_header_bytes

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        path: str,
        query: bytes = b"",
        own_api: bool = False,
        root: bool = False,
    ) -> None:
        """Relay to ``path``. ``own_api`` (the gateway's ``/models``): an upstream 401/403
        becomes a 502 saying the gateway's key was refused; ``/v1/*`` relays it as is."""
        info = request_info(scope)
        body = await self.read_request(scope, receive, send, info)
        if body is None:
            return
        if self.responses is None or not self.responses.applies(scope):
            await self.forward(scope, receive, send, info, body, path, query, own_api, root)
            return

        async def run(out: Send) -> None:
            await self.forward(scope, receive, out, info, body, path, query, own_api, root)

        async def hit(out: Send, stored: Stored, extra: HeaderList) -> None:
            await self.forward(scope, receive, out, info, body, path, replay=(stored, extra))

        await self.responses.serve(scope, send, info, body, path, run, hit)

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        info: RequestInfo,
        body: bytes,
        path: str,
        query: bytes = b"",
        own_api: bool = False,
        root: bool = False,
        *,
        replay: tuple[Stored, HeaderList] | None = None,
    ) -> None:
        """Admit the request (the key's limits), then relay it upstream — or, with
        ``replay``, send that stored answer instead (it counts as a request, no tokens)."""
        ticket = None
        if info.key is not None and info.key.policy:
            try:
                ticket = await self.admit(info, body, path)
            except GatewayError as exc:
                await exc.send(send)
                return
            if ticket is not None:
                body, send = ticket.body, ticket.wrap(send)
        if replay is not None:
            try:
                await replay[0].replay(send, replay[1])
            finally:
                if ticket is not None:
                    ticket.finish(info)
            return
        try:
            dispatch = self.router.route(scope["headers"], body, info)
        except ClientError as exc:  # no upstream serves the model
            await exc.send(send)
            if ticket is not None:
                ticket.finish(info)
            return
        # Each upstream adds its own authorization (its key, or credentials from its URL).
        headers = upstream_request_headers(
            scope["headers"], api_key=b"", request_id=info.request_id
        )
        method = scope["method"]

        async def attempt() -> UpstreamResponse:
            info.attempts += 1
            return await dispatch.send(method, path, query, headers, body, root=root)

        try:
            await self.guard(
                scope, receive, info, lambda: self._exchange(send, attempt, info, ticket, own_api)
            )
        finally:
            dispatch.release()  # the response is closed: the upstream's in-flight count ends
            if ticket is not None:
                ticket.finish(info)

    async def admit(
        self, info: RequestInfo, body: bytes, path: str, parsed: dict[str, Any] | None = None
    ) -> Ticket | None:
        """The caller's key's model list and limits (:class:`Limiter`); raises the client's
        error (403, 429, 503). Call only for a key with ``policy``; ``path`` is upstream's."""
        if self.limiter is None:
            return None
        if parsed is None:
            parsed = info.json_body(body)
        return await self.limiter.admit(info.key, info, body, path, parsed)

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
        self,
        scope: Scope,
        receive: Receive,
        info: RequestInfo,
        exchange: Callable[[], Awaitable[bool]],
    ) -> None:
        """Run ``exchange`` (True when it sent its response completely), cancelling it the
        moment the client disconnects so the upstream request is closed at once.

        The gateway's server calls back on a disconnect (:func:`on_disconnect`); under
        another server a plain task waits in ``receive()`` for it. Either cancels this
        task; that cancellation is absorbed here, any other (server shutdown)
        propagates, even if both happen at once.
        """
        task = asyncio.current_task()
        assert task is not None
        watching = True
        disconnected = False

        def lost() -> None:
            nonlocal disconnected
            # ``watching`` is False once ``exchange`` is over: never cancel the task later.
            if watching:
                disconnected = True
                info.disconnected_at = time.perf_counter()
                task.cancel()

        def on_watcher_done(watcher: asyncio.Task[None]) -> None:
            if not watcher.cancelled() and watcher.exception() is None:
                lost()

        watcher = None
        if not on_disconnect(scope, lost):
            watcher = asyncio.ensure_future(wait_disconnect(receive))
            watcher.add_done_callback(on_watcher_done)
        completed = False
        try:
            completed = await exchange()
        except asyncio.CancelledError:
            if not disconnected or task.uncancel() > 0:
                raise
        finally:
            watching = False
            if watcher is None:
                on_disconnect(scope, None)
            else:
                watcher.cancel()
        if disconnected and not completed:
            info.note = "client-disconnected"
            log.debug("client disconnected; upstream closed (id=%s)", info.id_text)

    async def open(
        self, attempt: Callable[[], Awaitable[UpstreamResponse]], info: RequestInfo
    ) -> UpstreamResponse:
        """``send_with_retry`` with the upstream time recorded; logs and re-raises failures."""
        start = time.perf_counter()
        try:
            response = await send_with_retry(attempt, self.policy)
            if not 200 <= response.status <= 599:
                # 1xx (101 to a client that never asked to upgrade) or not a status at all
                await response.aclose()
                raise UpstreamProtocolError(f"upstream answered status {response.status}")
            return response
        except UpstreamError as exc:
            info.note = exc.code or ""
            log.warning("upstream failed: %s (id=%s)", exc.message, info.id_text)
            raise
        finally:
            info.upstream_ms = (time.perf_counter() - start) * 1000

    async def _exchange(
        self,
        send: Send,
        attempt: Callable[[], Awaitable[UpstreamResponse]],
        info: RequestInfo,
        ticket: Ticket | None = None,
        own_api: bool = False,
    ) -> bool:
        """Returns True when the response was sent completely."""
        try:
            response = await self.open(attempt, info)
        except UpstreamError as exc:
            await exc.send(send)
            return True
        if response.status in (401, 403):
            # Never the client's key (it is not forwarded): say so in the access line.
            info.note = f"upstream-{response.status}:refused-VLLM_API_KEY"
            if own_api:
                await response.aclose()
                await UpstreamAuthRefused.for_status(response.status).send(send)
                return True
        headers = client_response_headers(response.headers)
        if not writable(headers):
            await response.aclose()
            error = UpstreamProtocolError("upstream sent a header the gateway cannot relay")
            info.note = error.code or ""
            log.warning("upstream failed: %s (id=%s)", error.message, info.request_id)
            await error.send(send)
            return True
        stream = is_event_stream(headers)
        if not stream:
            headers.append(server_timing(info, time.perf_counter()))
        meter = None
        if response.status == 200:
            if ticket is not None:
                meter = ticket.meter(info, stream=stream)
            elif self.meter:
                meter = Meter(info, stream=stream, strip=False)
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            if meter is None:
                async for chunk in response.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                async for chunk in response.chunks():
                    chunk = meter.feed(chunk)
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                rest = meter.close()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        except UpstreamError as exc:
            # The status is already sent: end without completing the body so the server
            # closes the connection and the client sees a cut, not a clean (short) answer.
            info.note = f"cut:{exc.code}"
            log.warning("upstream failed mid-response: %s (id=%s)", exc.message, info.id_text)
            return False
        finally:
            if meter is not None:
                meter.end()
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
        if (
            sub.startswith("/models")
            and not self.relay.router.single
            and (sub == "/models" or sub.startswith("/models/"))
            and scope["method"] in ("GET", "HEAD")
        ):  # many upstreams: the gateway answers with the union of their lists
            await send_catalog(self.relay.router, sub, send)
            return
        path = quote(sub, safe=_PATH_SAFE)
        root = sub.rstrip("/") in ROOT_PATHS  # vLLM serves these beside /v1, not under it
        await self.relay(scope, receive, send, path=path, query=scope["query_string"], root=root)


class RootRoute:
    """The gateway's own ``/tokenize`` and ``/detokenize``: relayed to the upstream's root,
    where vLLM serves them (``{VLLM_BASE_URL}`` without its ``/v1``)."""

    def __init__(self, relay: Relay, path: str) -> None:
        self.relay = relay
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await MethodNotAllowed(f"use POST {self.path}").send(send, [(b"allow", b"POST")])
            return
        await self.relay(scope, receive, send, path=self.path, root=True)
