"""Per-request context and the one-line access log.

:class:`AccessLogMiddleware` is the outermost wrapper: it settles the request
id (the client's ``X-Request-Id`` if sane, else a new one), returns it on every
response, and logs one line when the request ends::

    POST /v1/chat/completions 200 upstream=12.3ms bytes=4567 dur=812.0ms id=ab12... key=team-a

The key is named by its ``name``; bodies, keys and the ``authorization`` header are
never logged. Client-controlled values
(method, path) are escaped as nginx does (bytes outside printable ASCII, ``"`` and
``\\`` become ``\\xHH``), so one request is always one line.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson

from proxy.asgi import ASGIApp, Message, Receive, Scope, Send
from proxy.headers import REQUEST_ID, request_id_from

log = logging.getLogger("proxy.access")

SCOPE_KEY = "vllm_wrapper.request"
_UNPARSED: Any = object()

_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _hex(match: re.Match[str]) -> str:
    return "".join(f"\\x{b:02X}" for b in match.group().encode("utf-8", "backslashreplace"))


def escape(text: str) -> str:
    """``text`` safe for one log line: no control characters, no line separators."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return _UNSAFE.sub(_hex, text)


class RequestInfo:
    """What handlers record about a request for its log line."""

    __slots__ = (
        "_json",
        "attempts",
        "generated",
        "key",
        "model",
        "note",
        "request_id",
        "started",
        "upstream",
        "upstream_ms",
        "usage",
    )

    def __init__(self, request_id: bytes) -> None:
        self.started = time.perf_counter()
        self.request_id = request_id
        self.upstream_ms: float | None = None
        self.upstream = ""  # the chosen upstream's URL (without credentials), many upstreams only
        self.attempts = 0
        self.note = ""
        self._json: Any = _UNPARSED
        # Filled by auth (the caller's proxy.keys.Key), admission (model) and whoever
        # reads the answer's token usage: (prompt_tokens, completion_tokens), or, when a
        # stream ended without its usage, ``generated``: the answer events seen.
        self.key: Any = None
        self.model: str | None = None
        self.usage: tuple[int, int] | None = None
        self.generated = 0

    def json_body(self, body: bytes) -> dict[str, Any] | None:
        """The request body's top-level JSON object, parsed at most once per request.

        None when the body is not a JSON object. Stages that need a field of the
        request (routing's ``model``, limits' ``max_tokens``...) call this with the
        buffered body; the bytes sent upstream stay the client's own.
        """
        if self._json is _UNPARSED:
            try:
                parsed = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                parsed = None
            self._json = parsed if isinstance(parsed, dict) else None
        return self._json

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
        except Exception:
            # Starlette's error handler, outside this middleware, answers 500 when no
            # response has started (after that the server cuts the connection).
            status = status or 500
            raise
        finally:
            if self.enabled and log.isEnabledFor(logging.INFO):
                dur = (time.perf_counter() - start) * 1000
                up = f"{info.upstream_ms:.1f}ms" if info.upstream_ms is not None else "-"
                log.info(
                    "%s %s %s upstream=%s bytes=%d dur=%.1fms attempts=%d id=%s%s%s%s",
                    escape(scope["method"]),
                    escape(scope["path"]),
                    status or "-",
                    up,
                    sent,
                    dur,
                    info.attempts,
                    info.id_text,
                    f" key={info.key.name}" if info.key is not None else "",
                    f" via={info.upstream}" if info.upstream else "",
                    f" {info.note}" if info.note else "",
                )
