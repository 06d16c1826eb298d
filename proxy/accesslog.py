"""Per-request context and the one-line access log.

The outermost stage (:class:`proxy.front.Front`) settles the request id (the
client's ``X-Request-Id`` if sane, else a new one), returns it on every response,
and logs one line (:func:`log_request`) when the request ends::

    POST /v1/chat/completions 200 upstream=12.3ms bytes=4567 dur=812.0ms attempts=1 \
        key=team-a model=llama id=ab12... via=http://gpu-b:8000/v1

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

from proxy.asgi import Scope
from proxy.headers import request_id_from

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
    """What the stages learn about one request, for its log line and its metrics.

    The response's ``status``, ``headers_at``, ``first_byte_at`` (``perf_counter``
    times), ``response_headers`` and ``complete`` (its last body message went out) are
    recorded by :class:`proxy.front.Front`, which sees every message anyway.
    Filled as the request goes: ``key_name`` by auth (``invalid`` for a refused key),
    ``model`` by the stage that reads the request's model, ``body`` by the relay once
    read, the token counts by whoever reads the answer's usage, ``disconnected_at``
    (a ``perf_counter`` time) when the client went away before the answer was complete,
    ``outcome`` by a stage that ended a response cleanly but not as it should
    (``upstream_cut``). Unset fields cost nothing.
    """

    __slots__ = (
        "_json",
        "attempts",
        "body",
        "cache",
        "complete",
        "disconnected_at",
        "first_byte_at",
        "generated",
        "headers_at",
        "key",
        "key_name",
        "model",
        "note",
        "outcome",
        "request_id",
        "response_headers",
        "started",
        "status",
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
        # Filled by auth (the caller's proxy.keys.Key and its name; ``invalid`` for a
        # refused key), the stage that reads the request's model, and whoever reads the
        # answer's token usage: (prompt_tokens, completion_tokens), or, when a stream
        # ended without its usage, ``generated``: the answer events seen.
        self.key: Any = None
        self.key_name: str | None = None
        self.model: str | None = None
        self.usage: tuple[int, int] | None = None
        self.generated = 0
        # The response cache's verdict (HIT, MISS, BYPASS) when the cache is on.
        self.cache: str | None = None
        self.body = b""
        self.disconnected_at: float | None = None
        self.outcome: str | None = None
        self.status = 0
        self.headers_at: float | None = None
        self.first_byte_at: float | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def set_usage(self, usage: Any) -> None:
        """Record an OpenAI ``usage`` object's prompt and completion token counts."""
        if isinstance(usage, dict):
            self.usage = (
                _count(usage.get("prompt_tokens")),
                _count(usage.get("completion_tokens")),
            )

    @property
    def prompt_tokens(self) -> int:
        return self.usage[0] if self.usage is not None else 0

    @property
    def completion_tokens(self) -> int:
        return self.usage[1] if self.usage is not None else 0

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


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _shown(name: str | None) -> str:
    """A name for the log line: as is when short and plain, else quoted and cut."""
    if not name:
        return "-"
    if len(name) <= 128 and name.isprintable() and " " not in name:
        return name
    return ascii(name[:128])


def request_info(scope: Scope) -> RequestInfo:
    """The request's :class:`RequestInfo`, created on first use (e.g. when mounted bare)."""
    info: RequestInfo | None = scope.get(SCOPE_KEY)
    if info is None:
        info = RequestInfo(request_id_from(scope.get("headers", ())))
        scope[SCOPE_KEY] = info
    return info


def log_request(scope: Scope, info: RequestInfo, sent: int) -> None:
    """The request's access-log line (at INFO), when it ends; ``sent``: body bytes sent."""
    if not log.isEnabledFor(logging.INFO):
        return
    dur = (time.perf_counter() - info.started) * 1000
    up = f"{info.upstream_ms:.1f}ms" if info.upstream_ms is not None else "-"
    log.info(
        "%s %s %s upstream=%s bytes=%d dur=%.1fms attempts=%d key=%s model=%s id=%s%s%s",
        escape(scope["method"]),
        escape(scope["path"]),
        info.status or "-",
        up,
        sent,
        dur,
        info.attempts,
        info.key_name or "-",
        _shown(info.model),
        info.id_text,
        f" via={info.upstream}" if info.upstream else "",
        f" {info.note}" if info.note else "",
    )
