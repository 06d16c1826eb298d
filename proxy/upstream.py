"""The upstream vLLM server: one pooled HTTP client, and the one place httpx errors are mapped.

``Upstream`` is an async context manager so it works both in the app's
lifespan and in a host app that mounts the gateway (Starlette does not send
lifespan events to mounted apps).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from types import TracebackType

import httpx

from proxy.config import Settings
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


@contextmanager
def mapped_errors(phase: str) -> Iterator[None]:
    """Translate httpx exceptions into :class:`UpstreamError` (the only such place)."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise UpstreamConnectTimeout(f"upstream connect timeout during {phase}") from exc
    except httpx.PoolTimeout as exc:
        raise PoolExhausted(f"no free upstream connection during {phase}") from exc
    except httpx.TimeoutException as exc:  # read / write timeout
        raise UpstreamTimeout(f"upstream timed out during {phase} ({type(exc).__name__})") from exc
    except httpx.ConnectError as exc:
        raise UpstreamUnavailable(f"cannot connect to upstream during {phase}: {exc}") from exc
    except httpx.RemoteProtocolError as exc:
        # A peer that closes a pooled connection as we reuse it: safe to retry before any
        # response byte. After the response started this is a cut stream (not retried).
        raise UpstreamUnavailable(f"upstream closed the connection during {phase}") from exc
    except (httpx.ReadError, httpx.WriteError, httpx.CloseError) as exc:
        raise UpstreamUnavailable(f"upstream connection broke during {phase}: {exc}") from exc
    except httpx.DecodingError as exc:
        raise UpstreamProtocolError(f"upstream sent an undecodable response: {exc}") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"upstream error during {phase}: {exc}") from exc


class UpstreamResponse:
    """A response whose headers have arrived and whose body streams as raw bytes."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: HeaderList = [(k.lower(), v) for k, v in response.headers.raw]

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes exactly as received (no decoding); errors mapped to UpstreamError."""
        with mapped_errors("response body"):
            async for chunk in self._response.aiter_raw():
                if chunk:
                    yield chunk

    async def read(self) -> bytes:
        parts = [c async for c in self.chunks()]
        return b"".join(parts)

    async def aclose(self) -> None:
        await self._response.aclose()


class Upstream:
    """Owns the pooled client for one upstream base URL."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = settings.base_url.rstrip("/")
        self._api_key = settings.api_key
        t = settings.timeout
        self._timeout = httpx.Timeout(connect=t, read=t, write=t, pool=t)
        self._timeout_ext = {"timeout": self._timeout.as_dict()}
        self._probe_ext = {"timeout": httpx.Timeout(settings.health_timeout).as_dict()}
        self._limits = httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
            keepalive_expiry=settings.keepalive_expiry,
        )
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._users = 0

    @property
    def is_open(self) -> bool:
        """Whether the connection pool exists (between entering and leaving, or lazily)."""
        return self._client is not None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # Mounted without its lifespan: open lazily rather than fail every request.
            log.warning("upstream client opened outside the lifespan (see README, 'Mounting')")
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self._timeout,
            limits=self._limits,
            transport=self._transport,
            follow_redirects=False,
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
            await client.aclose()

    def url(self, path: str, query: bytes = b"") -> str:
        """``path`` is relative to the base URL (``/chat/completions``)."""
        url = self.base_url + path
        if query:
            url += "?" + query.decode("latin-1")
        return url

    async def send(
        self, method: str, url: str, headers: HeaderList, body: bytes
    ) -> UpstreamResponse:
        """Send one request; return once the response headers are in. Body not yet read."""
        # httpx.Request directly (not client.build_request) so the client's default
        # headers (accept-encoding, user-agent...) are not added to the client's own.
        # The timeout travels in the request's extensions (build_request would set it).
        request = httpx.Request(
            method, url, headers=headers, content=body, extensions=self._timeout_ext
        )
        with mapped_errors("request"):
            response = await self.client.send(request, stream=True)
        return UpstreamResponse(response)

    async def probe(self) -> tuple[bool, str]:
        """Quick availability check: ``GET {base}/models`` with the short health timeout."""
        headers = [(b"authorization", b"Bearer " + self._api_key.encode())] if self._api_key else []
        request = httpx.Request(
            "GET", self.url("/models"), headers=headers, extensions=self._probe_ext
        )
        try:
            response = await self.client.send(request)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        if response.status_code == 200:
            return True, "ok"
        return False, f"upstream answered {response.status_code}"
