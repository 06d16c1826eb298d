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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType

import aiohttp
import orjson
from yarl import URL

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

# Headers aiohttp would add on its own; the relay forwards the client's instead.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


@contextmanager
def mapped_errors(phase: str) -> Iterator[None]:
    """Translate client exceptions into :class:`UpstreamError` (the only such place)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamConnectTimeout(f"upstream connect timeout during {phase}") from exc
    except PoolFull as exc:
        raise PoolExhausted(f"no free upstream connection during {phase}") from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:  # read timeout
        raise UpstreamTimeout(
            f"upstream read timeout during {phase}: nothing received within VLLM_TIMEOUT"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(f"cannot connect to upstream during {phase}: {exc}") from exc
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


class UpstreamResponse:
    """A response whose headers have arrived and whose body streams as raw bytes."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: HeaderList = [(k.lower(), v) for k, v in response.raw_headers]

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as received (no decoding, no re-chunking); errors mapped to UpstreamError."""
        content = self._response.content
        with mapped_errors("response body"):
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

    def __init__(
        self, settings: Settings, *, observe: Callable[[str, str], None] | None = None
    ) -> None:
        self.base_url = settings.base_url.rstrip("/")
        # Each attempt's (upstream without credentials, outcome), e.g. for metrics.
        self.label = settings.public_base_url
        self._observe = observe
        self._api_key = settings.api_key
        t = settings.timeout
        # sock_read is the idle time between two reads (also waiting for the headers),
        # not a cap on a long stream; connect includes waiting for a pooled connection.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
        h = settings.health_timeout
        self._probe_timeout = aiohttp.ClientTimeout(total=h, connect=h, sock_read=h)
        self._max_connections = settings.max_connections
        self._keepalive = settings.keepalive_expiry
        self._client: aiohttp.ClientSession | None = None
        self._users = 0

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

    def url(self, path: str, query: bytes = b"") -> str:
        """``path`` is relative to the base URL (``/chat/completions``), already %-quoted."""
        url = self.base_url + path
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
        try:
            with mapped_errors("request"):
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
        except UpstreamError as exc:
            if self._observe is not None:
                self._observe(self.label, attempt_outcome(None, exc))
            raise
        if self._observe is not None:
            self._observe(self.label, attempt_outcome(response.status))
        return UpstreamResponse(response)

    @asynccontextmanager
    async def _get_models(self) -> AsyncIterator[aiohttp.ClientResponse]:
        headers = {"authorization": "Bearer " + self._api_key} if self._api_key else {}
        async with self.client.get(
            URL(self.url("/models"), encoded=True),
            headers=headers,
            timeout=self._probe_timeout,
            allow_redirects=False,
        ) as response:
            yield response

    async def probe(self) -> tuple[bool, str]:
        """Quick availability check: ``GET {base}/models`` with the short health timeout."""
        try:
            async with self._get_models() as response:
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            return False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        if status == 200:
            return True, "ok"
        return False, f"upstream answered {status}"

    async def model_ids(self) -> list[str] | None:
        """The model ids the upstream's ``/models`` lists (short health timeout); None when
        it does not answer 200 with a model list."""
        try:
            async with self._get_models() as response:
                if response.status != 200:
                    return None
                body = await response.read()
            data = orjson.loads(body)["data"]
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (TimeoutError, aiohttp.ClientError):
            return None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
