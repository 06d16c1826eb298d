"""The upstream vLLM server: one pooled HTTP client, and the one place its errors are mapped.

The client is aiohttp's: its connection pool hands out a connection in
constant time and its HTTP parser is in C, where httpx/httpcore scan every
pooled connection (with a ``select`` on each socket) per request and parse in
pure Python; bench/RESULTS.md has the measurements that decided it.

``Upstream`` is an async context manager so it works both in the app's
lifespan and in a host app that mounts the gateway (Starlette does not send
lifespan events to mounted apps). It needs an asyncio event loop.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import aiohttp
import orjson
from aiohttp.client_proto import ResponseHandler
from yarl import URL

from proxy.config import ConfigError, Settings, redact_url
from proxy.errors import (
    PoolExhausted,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.headers import HeaderList

log = logging.getLogger(__name__)

# The most :meth:`UpstreamResponse.read` takes in (a whole answer the gateway parses).
MAX_READ_BYTES = 16 * 1024 * 1024

# Headers aiohttp would add on its own; the relay forwards the client's instead.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


@contextmanager
def mapped_errors(phase: str, timeout: float) -> Iterator[None]:
    """Translate client exceptions into :class:`UpstreamError` (the only such place)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamConnectTimeout(
            f"upstream connect timeout during {phase} (VLLM_TIMEOUT={timeout:g} s)"
        ) from exc
    except PoolFull as exc:
        raise PoolExhausted(f"no free upstream connection during {phase}") from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:  # read timeout
        raise UpstreamTimeout(
            f"upstream read timeout during {phase}: nothing received within "
            f"VLLM_TIMEOUT={timeout:g} s"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(
            f"cannot connect to upstream {exc.host}:{exc.port} during {phase}: {_os_reason(exc)}"
        ) from exc
    except aiohttp.ServerDisconnectedError as exc:
        # A peer that closes a pooled connection as we reuse it: safe to retry before any
        # response byte. After the response started this is a cut stream (not retried).
        raise UpstreamUnavailable(f"upstream closed the connection during {phase}") from exc
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        raise UpstreamUnavailable(f"upstream connection broke during {phase}: {exc}") from exc
    except aiohttp.ClientResponseError as exc:  # unparsable status line or headers
        raise UpstreamProtocolError(f"upstream sent an invalid response: {exc.message}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"upstream error during {phase}: {exc}") from exc


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    """``connection refused`` rather than aiohttp's text (which names ``ssl:default``...)."""
    err = exc.os_error
    errno = getattr(err, "errno", None)
    text = os.strerror(errno) if errno else (str(err) or type(err).__name__)
    return text[:1].lower() + text[1:]


def attempt_outcome(status: int | None, error: UpstreamError | None = None) -> str:
    """One attempt's result as a metrics label: ``2xx``..``5xx``, or what failed."""
    if error is None:
        return f"{(status or 0) // 100}xx"
    if isinstance(error, PoolExhausted):
        return "pool_exhausted"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamProtocolError):
        return "protocol_error"
    return "connection_error"


class PoolFull(Exception):
    """No pooled connection came free within the timeout."""


class _IdleGuard(ResponseHandler):
    """A pooled connection that the upstream writes to while it is idle is closed.

    aiohttp would parse such bytes (a late second response) and hand them to the next
    request sent on the connection as its answer: another client's response.
    """

    idle = False

    def data_received(self, data: bytes) -> None:
        if self.idle and data:  # aiohttp calls it with b"" itself to resume reading
            log.warning("upstream wrote %d bytes on an idle connection; closing it", len(data))
            self.force_close()
            self.close()
            return
        super().data_received(data)


class _GuardedConnector(aiohttp.TCPConnector):
    """``TCPConnector`` whose connections are :class:`_IdleGuard` s, idle while pooled.

    ``_factory``, ``_release`` and ``_get`` are aiohttp internals (as of 3.14): the pool
    has no public hook for "a connection went back" or "one is handed out".
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._factory = functools.partial(_IdleGuard, loop=self._loop)

    def _release(self, key, protocol, *, should_close=False):  # type: ignore[no-untyped-def]
        super()._release(key, protocol, should_close=should_close)
        if protocol.transport is not None:  # pooled, not closed
            protocol.idle = True

    async def _get(self, key, traces):  # type: ignore[no-untyped-def]
        while True:
            connection = await super()._get(key, traces)
            if connection is None:
                return None
            protocol = connection.protocol
            protocol.idle = False
            if not protocol.should_close:
                return connection
            connection.close()  # it holds bytes nobody asked for: never reuse it


class UpstreamResponse:
    """A response whose headers have arrived and whose body streams as raw bytes."""

    __slots__ = ("_response", "_timeout", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, timeout: float) -> None:
        self._response = response
        self._timeout = timeout
        self.status = response.status
        self.headers: HeaderList = [(k.lower(), v) for k, v in response.raw_headers]

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as received (no decoding, no re-chunking); errors mapped to UpstreamError."""
        content = self._response.content
        with mapped_errors("response body", self._timeout):
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk

    async def read(self, limit: int = MAX_READ_BYTES) -> bytes:
        """The whole body; UpstreamProtocolError once it grows past ``limit`` bytes."""
        parts = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamProtocolError(f"upstream answer is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Release or close the connection. Never suspends, so a pending cancellation
        cannot cut it short in a ``finally``."""
        response = self._response
        if response.content.at_eof():
            response.release()  # back to the pool
        else:
            response.close()  # unread body: the connection cannot be reused; vLLM aborts


def split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without ``user:pass@``, and the ``Basic`` authorization those credentials make."""
    parts = URL(url)
    if parts.user is None and parts.password is None:
        return url.rstrip("/"), None
    plain = str(parts.with_user(None)).rstrip("/")
    pair = f"{parts.user or ''}:{parts.password or ''}".encode()
    return plain, "Basic " + base64.b64encode(pair).decode("ascii")


class Upstream:
    """Owns the pooled client for one upstream base URL.

    ``url``, ``api_key`` and ``max_connections`` override the settings' (one entry of
    ``[[upstreams]]``). Credentials in the URL (``http://user:pass@host/v1``) become a
    ``Basic`` authorization when there is no API key; with both, start-up is refused.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        api_key: str | None = None,
        max_connections: int | None = None,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        base, basic = split_credentials(url if url is not None else settings.base_urls[0])
        self.base_url = base
        self.public_url = redact_url(base)
        self.label = self.public_url  # the metrics' ``upstream`` label
        # Each attempt's (upstream without credentials, outcome), e.g. for metrics.
        self._observe = observe
        key = settings.api_key if api_key is None else api_key
        if key and basic:
            raise ConfigError(
                f"upstream {self.public_url}: the URL carries credentials and an API key is "
                "set; both would claim the Authorization header, give one"
            )
        self._api_key = key
        self.authorization = ("Bearer " + key) if key else basic
        t = self.timeout = settings.timeout
        c = min(settings.connect_timeout, t)
        # sock_read is the idle time between two reads (also waiting for the headers),
        # not a cap on a long stream; connect includes waiting for a pooled connection,
        # sock_connect is the TCP (and TLS) connect alone: short, so a black-holed upstream
        # is failed over in seconds.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=c, sock_read=t)
        h = settings.health_timeout
        self._probe_timeout = aiohttp.ClientTimeout(total=h, connect=h, sock_read=h)
        self._max_connections = max_connections or settings.max_connections
        self._keepalive = settings.keepalive_expiry
        self._client: aiohttp.ClientSession | None = None
        self._users = 0
        self._down: str | None = None  # why the upstream is down; None while it answers

    @property
    def is_open(self) -> bool:
        """Whether the connection pool exists (between entering and leaving, or lazily)."""
        return self._client is not None

    @property
    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            # Mounted without its lifespan: open lazily rather than fail every request.
            log.warning("upstream client opened outside the lifespan (see README, 'Mounting')")
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> aiohttp.ClientSession:
        connector = _GuardedConnector(
            limit=self._max_connections,
            limit_per_host=0,
            keepalive_timeout=self._keepalive or None,
            force_close=self._keepalive == 0,
            ttl_dns_cache=10,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,  # relay the bytes as sent
            skip_auto_headers=_SKIP_AUTO,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def __aenter__(self) -> Upstream:
        # Re-entrant: a host app may run our lifespan and we may be entered again.
        if self._client is None:
            self._client = self._new_client()
        self._users += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self._users -= 1
        if self._users <= 0 and self._client is not None:
            client, self._client = self._client, None
            self._users = 0
            await client.close()

    def url(self, path: str, query: bytes = b"", *, root: bool = False) -> str:
        """``path`` is relative to the base URL (``/chat/completions``), already %-quoted;
        with ``root``, relative to the server's root (the base URL without ``/v1``)."""
        url = (self.root_url if root else self.base_url) + path
        if query:
            url += "?" + query.decode("latin-1")
        return url

    def _pool_full(self) -> bool:
        connector = self.client.connector
        acquired = getattr(connector, "_acquired", None)  # aiohttp keeps no public count
        return acquired is not None and len(acquired) >= self._max_connections

    async def send(
        self, method: str, url: str, headers: HeaderList, body: bytes
    ) -> UpstreamResponse:
        """Send one request; return once the response headers are in. Body not yet read."""
        str_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
        if self.authorization is not None:
            str_headers.append(("authorization", self.authorization))
        try:
            return await self._send(method, url, str_headers, body)
        except UpstreamError as exc:
            if self._observe is not None:
                self._observe(self.label, attempt_outcome(None, exc))
            raise

    async def _send(
        self, method: str, url: str, str_headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        with mapped_errors("request", self.timeout):
            try:
                response = await self.client.request(
                    method,
                    URL(url, encoded=True),  # the relay quoted the path already
                    headers=str_headers,
                    data=body or None,
                    allow_redirects=False,
                )
            except aiohttp.ConnectionTimeoutError:
                if self._pool_full():
                    raise PoolFull from None
                raise
            except aiohttp.ClientConnectorError as exc:
                self.mark(f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc)}")
                raise
        if self._observe is not None:
            self._observe(self.label, attempt_outcome(response.status))
        if self._down is not None:
            self.mark(None)
        return UpstreamResponse(response, self.timeout)

    def mark(self, down: str | None) -> None:
        """Record whether the upstream answers; log only the changes (down once, up once)."""
        if down is not None and self._down is None:
            log.warning("upstream %s is unavailable: %s", self.public_url, down)
        elif down is None and self._down is not None:
            log.info("upstream %s is available again", self.public_url)
        self._down = down

    async def probe(self, model: str | None = None) -> tuple[bool, str]:
        """Quick availability check: ``GET {base}/models`` with the short health timeout.

        Returns ``(ok, reason)``: ``reason`` is ``"ok"`` or a short text, safe to show,
        saying what failed and what to check; with ``model``, it must be in the list.
        """
        ok, reason, body = await self._probe(want_body=bool(model))
        self.mark(None if ok else reason)
        if ok and model:
            served = served_models(body)
            if served is not None and model not in served:
                shown = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
                return False, f"model {model} is not served (VLLM_MODEL); it serves [{shown}]"
        return ok, reason

    async def _probe(self, *, want_body: bool) -> tuple[bool, str, bytes]:
        headers = {"authorization": self.authorization} if self.authorization else {}
        h = self._probe_timeout.total or 0.0
        try:
            async with self.client.get(
                URL(self.url("/models"), encoded=True),
                headers=headers,
                timeout=self._probe_timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                body = await response.read() if status == 200 and want_body else b""
        except aiohttp.ClientConnectorError as exc:
            return False, f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc)}", b""
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return False, f"no answer within {h:g} s (VLLM_WRAPPER_HEALTH_TIMEOUT)", b""
        except aiohttp.ClientError as exc:
            return False, f"upstream connection failed: {type(exc).__name__}", b""
        if status in (401, 403):
            reason = (
                f"upstream answered {status}: it refused the gateway's credentials "
                "(check VLLM_API_KEY)"
            )
        elif status == 404:
            reason = "upstream answered 404 for /models: does VLLM_BASE_URL end in /v1?"
        elif status != 200:
            reason = f"upstream answered {status} for /models"
        else:
            return True, "ok", body
        return False, reason, b""

    async def model_ids(self) -> list[str] | None:
        """The model ids the upstream's ``/models`` lists (short health timeout); None when
        it does not answer 200 with a model list."""
        ok, _reason, body = await self._probe(want_body=True)
        return served_models(body) if ok else None

    @property
    def root_url(self) -> str:
        """The server root (``/health``, ``/metrics`` live there): the base without ``/v1``."""
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    async def fetch(self, url: str) -> tuple[int, bytes]:
        """``GET url`` (health check, model list, metrics) within the health timeout.

        Returns the status and body; raises :class:`UpstreamError` when there is no answer.
        """
        headers = {"authorization": self.authorization} if self.authorization else {}
        with mapped_errors("health check", self._probe_timeout.total or 0.0):
            async with self.client.get(
                URL(url, encoded=True),
                headers=headers,
                timeout=self._probe_timeout,
                allow_redirects=False,
            ) as response:
                return response.status, await response.read()


def served_models(body: bytes) -> list[str] | None:
    """The ids in a ``/models`` list, or None when the body is not one."""
    try:
        data = orjson.loads(body)["data"]
        return [str(m["id"]) for m in data]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
