"""The upstream vLLM server: one pooled HTTP client, and the one place its errors are mapped.

The client is our own lean HTTP/1.1 client (:mod:`proxy.h1client`: asyncio Protocols,
httptools' C parser, one pool per upstream). It replaced aiohttp's ``ClientSession``
on measured CPU cost (issue 18: about 40 % less gateway CPU per non-streaming request
behind a fast upstream, A/B on the same machine), as aiohttp had replaced httpx.

``Upstream`` is an async context manager so it works both in the app's
lifespan and in a host app that mounts the gateway (Starlette does not send
lifespan events to mounted apps). It needs an asyncio event loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

from proxy import h1client as h1
from proxy.config import ConfigError, Settings, redact_url
from proxy.errors import (
    PoolExhausted,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.h1client import PoolFull
from proxy.headers import HeaderList
from proxy.version import VERSION

__all__ = ["MAX_READ_BYTES", "PoolFull", "Upstream", "UpstreamResponse", "mapped_errors"]

log = logging.getLogger(__name__)
# The gateway's own requests (health checks, model lists, metrics) say who sends them.
_OWN_HEADERS = [(b"user-agent", f"vllm-wrapper/{VERSION}".encode())]

# The most :meth:`UpstreamResponse.read` takes in (a whole answer the gateway parses).
MAX_READ_BYTES = 16 * 1024 * 1024


def _mapped(exc: BaseException, phase: str, timeout: float) -> UpstreamError | None:
    """The :class:`UpstreamError` for a client exception; None when it is not one."""
    if isinstance(exc, h1.PoolFull):
        return PoolExhausted(f"no free upstream connection during {phase}")
    if isinstance(exc, h1.ConnectTimeout):
        return UpstreamConnectTimeout(
            f"upstream connect timeout during {phase} (VLLM_TIMEOUT={timeout:g} s)"
        )
    if isinstance(exc, TimeoutError):  # read timeout
        return UpstreamTimeout(
            f"upstream read timeout during {phase}: nothing received within "
            f"VLLM_TIMEOUT={timeout:g} s"
        )
    if isinstance(exc, h1.ConnectError):
        return UpstreamUnavailable(
            f"cannot connect to upstream {exc.host}:{exc.port} during {phase}: {_os_reason(exc)}"
        )
    if isinstance(exc, h1.Disconnected):
        # A peer that closes a pooled connection as we reuse it: safe to retry before any
        # response byte. After the response started this is a cut stream (not retried).
        return UpstreamUnavailable(f"upstream closed the connection during {phase}")
    if isinstance(exc, h1.BrokenConnection):
        return UpstreamUnavailable(f"upstream connection broke during {phase}: {exc}")
    if isinstance(exc, h1.BadResponse):  # unparsable status line, headers or framing
        return UpstreamProtocolError(f"upstream sent an invalid response: {exc}")
    if isinstance(exc, h1.ClientError):
        return UpstreamError(f"upstream error during {phase}: {exc}")
    return None


@contextmanager
def mapped_errors(phase: str, timeout: float) -> Iterator[None]:
    """Translate client exceptions into :class:`UpstreamError` (the only such place)."""
    try:
        yield
    except (h1.ClientError, TimeoutError) as exc:
        mapped = _mapped(exc, phase, timeout)
        if mapped is None:
            raise
        raise mapped from exc


def _os_reason(exc: h1.ConnectError) -> str:
    """``connection refused``: the OS's words for why the connect failed."""
    err = exc.os_error
    if isinstance(err, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
        text = getattr(err, "verify_message", None) or err.reason or str(err)
        return f"TLS: {text}"
    errno = getattr(err, "errno", None)
    text = os.strerror(errno) if isinstance(errno, int) and errno > 0 else ""
    if not text:
        text = str(err) or type(err).__name__
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


class UpstreamResponse:
    """A response whose headers have arrived and whose body streams as raw bytes."""

    __slots__ = ("_response", "_timeout", "headers", "status")

    def __init__(self, response: h1.Response, timeout: float) -> None:
        self._response = response
        self._timeout = timeout
        self.status = response.status
        self.headers: HeaderList = response.headers  # names already lower-case

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as received (de-chunked, never decoded or re-chunked); errors mapped
        to UpstreamError."""
        readany = self._response.readany
        with mapped_errors("response body", self._timeout):
            while True:
                chunk = await readany()
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
        cannot cut it short in a ``finally``. A body not received whole closes the
        connection (it cannot be reused; vLLM aborts the generation)."""
        self._response.close()


def split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without ``user:pass@``, and the ``Basic`` authorization those credentials make."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url.rstrip("/"), None
    plain = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
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
        self._auth_line = (
            b"authorization: " + self.authorization.encode("latin-1") + b"\r\n"
            if self.authorization
            else b""
        )
        t = self.timeout = settings.timeout
        # The read timeout is the idle time between two reads (also waiting for the head),
        # not a cap on a long stream; waiting for a free pooled connection is bounded by
        # VLLM_TIMEOUT, the TCP (and TLS) connect alone by the short connect timeout, so a
        # black-holed upstream is failed over in seconds.
        self._connect_timeout = min(settings.connect_timeout, t)
        self._health_timeout = settings.health_timeout
        self._max_connections = max_connections or settings.max_connections
        self._keepalive = settings.keepalive_expiry
        self._client: h1.Pool | None = None
        self._origins: dict[str, h1.Origin] = {}
        self._users = 0
        self._down: str | None = None  # why the upstream is down; None while it answers

    @property
    def is_open(self) -> bool:
        """Whether the connection pool exists (between entering and leaving, or lazily)."""
        return self._client is not None

    @property
    def client(self) -> h1.Pool:
        if self._client is None:
            # Mounted without its lifespan: open lazily rather than fail every request.
            log.warning("upstream client opened outside the lifespan (see README, 'Mounting')")
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> h1.Pool:
        return h1.Pool(
            max_connections=self._max_connections,
            keepalive=self._keepalive,
            connect_timeout=self._connect_timeout,
            pool_timeout=self.timeout,
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

    def url(self, path: str, query: bytes = b"", *, root: bool = False) -> str:
        """``path`` is relative to the base URL (``/chat/completions``), already %-quoted;
        with ``root``, relative to the server's root (the base URL without ``/v1``)."""
        url = (self.root_url if root else self.base_url) + path
        if query:
            url += "?" + query.decode("latin-1")
        return url

    def _split(self, url: str) -> tuple[h1.Origin, bytes]:
        """``url`` (already %-quoted) as its origin and the request target."""
        cut = url.find("/", url.find("://") + 3)
        prefix, target = (url, "/") if cut < 0 else (url[:cut], url[cut:])
        origin = self._origins.get(prefix)
        if origin is None:
            if len(self._origins) > 16:
                self._origins.clear()
            origin = self._origins[prefix] = h1.Origin(prefix)
        return origin, target.encode("latin-1")

    async def send(
        self, method: str, url: str, headers: HeaderList, body: bytes
    ) -> UpstreamResponse:
        """Send one request; return once the response headers are in. Body not yet read."""
        origin, target = self._split(url)
        try:
            response = await self.client.request(
                method.encode("ascii"),
                origin,
                target,
                headers,
                body,
                self.timeout,
                self._auth_line,
            )
        except (h1.ClientError, TimeoutError) as exc:
            if isinstance(exc, h1.ConnectError):
                self.mark(f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc)}")
            error = _mapped(exc, "request", self.timeout)
            if error is None:
                raise
            if self._observe is not None:
                self._observe(self.label, attempt_outcome(None, error))
            raise error from exc
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

    async def _get(
        self, url: str, *, want_body: bool = True, only_ok: bool = False
    ) -> tuple[int, bytes]:
        """``GET url`` within the health timeout: its status and (if wanted, and with
        ``only_ok`` only for a 200) its body."""
        h = self._health_timeout
        origin, target = self._split(url)
        async with asyncio.timeout(h):
            response = await self.client.request(
                b"GET", origin, target, _OWN_HEADERS, b"", h, self._auth_line
            )
            try:
                upstream = UpstreamResponse(response, h)
                status = response.status
                if want_body and (status == 200 or not only_ok):
                    return status, await upstream.read()
                return status, b""
            finally:
                response.close()

    async def _probe(self, *, want_body: bool) -> tuple[bool, str, bytes]:
        h = self._health_timeout
        try:
            status, body = await self._get(self.url("/models"), want_body=want_body, only_ok=True)
        except h1.ConnectError as exc:
            return False, f"cannot connect to {exc.host}:{exc.port}: {_os_reason(exc)}", b""
        except (TimeoutError, UpstreamTimeout):
            return False, f"no answer within {h:g} s (VLLM_WRAPPER_HEALTH_TIMEOUT)", b""
        except (h1.ClientError, UpstreamError) as exc:
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
        with mapped_errors("health check", self._health_timeout):
            return await self._get(url)


def served_models(body: bytes) -> list[str] | None:
    """The ids in a ``/models`` list, or None when the body is not one."""
    try:
        data = orjson.loads(body)["data"]
        return [str(m["id"]) for m in data]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
