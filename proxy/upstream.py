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

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from types import TracebackType

import aiohttp
import orjson
from yarl import URL

from proxy.config import Settings, redact_url
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


class PoolFull(Exception):
    """No pooled connection came free within the timeout."""


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

    async def read(self) -> bytes:
        parts = [c async for c in self.chunks()]
        return b"".join(parts)

    async def aclose(self) -> None:
        """Release or close the connection. Never suspends, so a pending cancellation
        cannot cut it short in a ``finally``."""
        response = self._response
        if response.content.at_eof():
            response.release()  # back to the pool
        else:
            response.close()  # unread body: the connection cannot be reused; vLLM aborts


class Upstream:
    """Owns the pooled client for one upstream base URL."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.base_url.rstrip("/")
        # vLLM serves a few routes (/tokenize, /detokenize) at its root, beside /v1.
        self.root_url = self.base_url.removesuffix("/v1")
        self._api_key = settings.api_key
        t = self.timeout = settings.timeout
        # sock_read is the idle time between two reads (also waiting for the headers),
        # not a cap on a long stream; connect includes waiting for a pooled connection.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
        h = settings.health_timeout
        self._probe_timeout = aiohttp.ClientTimeout(total=h, connect=h, sock_read=h)
        self._max_connections = settings.max_connections
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
        connector = aiohttp.TCPConnector(
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

    @property
    def public_url(self) -> str:
        return redact_url(self.base_url)

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
        headers = {"authorization": "Bearer " + self._api_key} if self._api_key else {}
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


def served_models(body: bytes) -> list[str] | None:
    """The ids in a ``/models`` list, or None when the body is not one."""
    try:
        data = orjson.loads(body)["data"]
        return [str(m["id"]) for m in data]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
