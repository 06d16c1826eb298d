"""Response cache and idempotency over a :class:`~proxy.state.State` (SPEC §12).

:class:`Responses` is one stage around an exchange (the ``/v1`` relay's, or the
whole ``/chat`` app's). For each request it decides, in this order:

1. ``Idempotency-Key`` on a POST (:mod:`proxy.idempotency`): a repeat of a finished
   request gets its stored answer (``idempotent-replayed: true``), a repeat of a
   running one 409, the same key with another body 422; the first attempt runs.
2. The cache (``[cache] enabled``): a reproducible request (``temperature`` 0 or a
   ``seed``, one choice; embeddings always) of ``/v1/chat/completions``,
   ``/v1/completions``, ``/v1/embeddings`` or ``/chat`` is looked up by path, exact
   body and model (and the caller's key, unless ``shared``); a hit is replayed
   (``x-cache: HIT``, ``age``), a miss runs and is stored once it completed
   (``x-cache: MISS``); anything else runs untouched (``x-cache: BYPASS``).
   ``Cache-Control: no-cache`` skips the lookup, ``no-store`` the cache.

Only a complete 200 answer is stored: never an error, a stream cut by the upstream,
an answer to a client that left (the exchange is cancelled before its last message),
nor one over ``max_entry_bytes``. What is stored is what the client received (a
stream's SSE bytes as sent), with the headers that describe the body; a replay sends
the same bytes as fast as the client reads them.

A cache hit still passes admission (it counts against the key's request limits) but
charges no tokens: nothing was generated.

The stage is built only when the cache or idempotency is on; with both off the relay
does no work for it (no header scan, no body parse).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Message, Receive, Scope, Send, with_headers
from proxy.errors import GatewayError
from proxy.headers import HeaderList, get_header
from proxy.state import State, StateUnavailable

log = logging.getLogger(__name__)

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"

# Upstream paths (relative to /v1) and /chat; True: cached only when reproducible.
CACHED_PATHS = {"/chat/completions": True, "/completions": True, "/embeddings": False}
CHAT_PATH = "/chat"

# Headers that belong to one response, not to the body: never stored, never replayed.
_VOLATILE = frozenset(
    {
        b"date",
        b"server",
        b"x-request-id",
        b"server-timing",
        b"x-cache",
        b"age",
        b"idempotent-replayed",
        b"retry-after",
        b"retry-after-ms",
    }
)
_REPLAY_CHUNK = 64 * 1024
_LOG_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """``[cache]``: the response cache and idempotency."""

    enabled: bool = False
    shared: bool = False
    ttl: float = 3600.0
    max_bytes: int = 256 * 1024 * 1024
    max_entry_bytes: int = 8 * 1024 * 1024
    idempotency: bool = True
    idempotency_ttl: float = 86400.0
    idempotency_lease: float = 600.0


@dataclass(slots=True)
class Stored:
    """A complete answer: status, the headers that describe the body, the body bytes."""

    status: int
    headers: HeaderList
    body: bytes
    created: float

    def encode(self) -> bytes:
        head = orjson.dumps(
            {
                "s": self.status,
                "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
                "t": self.created,
            }
        )
        return head + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Stored | None:
        """None when ``data`` is not an encoded answer (never raises)."""
        head, sep, body = data.partition(b"\n")
        try:
            meta = orjson.loads(head) if sep else None
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]]
            return cls(int(meta["s"]), headers, body, float(meta["t"]))
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
            return None

    async def replay(self, send: Send, extra: HeaderList) -> None:
        """Send this answer again; each piece waits for the client to take the last."""
        await send(
            {"type": "http.response.start", "status": self.status, "headers": self.headers + extra}
        )
        body = self.body
        for i in range(0, len(body), _REPLAY_CHUNK):
            more = i + _REPLAY_CHUNK < len(body)
            await send(
                {
                    "type": "http.response.body",
                    "body": body[i : i + _REPLAY_CHUNK],
                    "more_body": more,
                }
            )
        if not body:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class Recorder:
    """A ``send`` that passes every message on (adding ``extra`` headers to the start)
    and keeps a copy of the answer, up to ``limit`` bytes of body."""

    __slots__ = ("chunks", "complete", "extra", "headers", "limit", "send", "size", "status")

    def __init__(self, send: Send, limit: int, extra: HeaderList) -> None:
        self.send = send
        self.limit = limit
        self.extra = extra
        self.status = 0
        self.headers: HeaderList = []
        self.chunks: list[bytes] | None = []
        self.size = 0
        self.complete = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = list(message.get("headers", ()))
            self.headers = [
                (k, v)
                for k, v in headers
                if k.lower() not in _VOLATILE and not k.lower().startswith(b"x-ratelimit-")
            ]
            if self.extra:
                message["headers"] = headers + self.extra
            await self.send(message)
            return
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body and self.chunks is not None:
                self.size += len(body)
                if self.size > self.limit:
                    self.chunks = None  # too big to keep: stop copying
                else:
                    self.chunks.append(body)
            await self.send(message)
            if not message.get("more_body", False):
                self.complete = True
            return
        await self.send(message)

    def result(self) -> Stored | None:
        """The answer, if it is a complete 200 that may be stored."""
        if not self.complete or self.status != 200 or self.chunks is None:
            return None
        control = get_header(self.headers, b"cache-control")
        if control is not None and b"no-store" in control.lower():
            return None
        body = b"".join(self.chunks)
        content_type = get_header(self.headers, b"content-type") or b""
        if content_type.startswith(b"text/event-stream") and not body.endswith(b"[DONE]\n\n"):
            return None  # a stream that ended without its last event is not an answer
        return Stored(self.status, self.headers, body, time.time())


def reproducible(path: str, parsed: dict[str, Any] | None) -> bool:
    """Whether the request's answer is the same every time it is asked (SPEC §12)."""
    needs = CACHED_PATHS.get(path)
    if needs is None or parsed is None:
        return False
    if not needs:
        return True
    n = parsed.get("n", 1)
    if n is not None and n != 1:
        return False
    best_of = parsed.get("best_of")
    if best_of is not None and best_of != 1:
        return False
    seed = parsed.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return True
    temperature = parsed.get("temperature")
    return (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
    )


def cache_control(headers: HeaderList) -> tuple[bool, bool]:
    """``(no_cache, no_store)`` from the request's ``Cache-Control``."""
    value = get_header(headers, b"cache-control")
    if value is None:
        return False, False
    directives = {d.strip().split(b"=", 1)[0] for d in value.lower().split(b",")}
    return b"no-cache" in directives, b"no-store" in directives


def owner(info: RequestInfo) -> str:
    """Whose entries a request sees: its key's name, ``-`` without auth."""
    return info.key.name if info.key is not None else "-"


class Throttled:
    """Logs a state failure at most once a minute, counting them all."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0
        self._logged = -math.inf

    def __call__(self, exc: StateUnavailable) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY:
            self._logged = now
            log.warning(
                "%s: state unavailable (%s); %d failures so far", self.what, exc, self.failures
            )


class ResponseCache:
    """Cached answers in a :class:`State`, keyed per owner (or shared)."""

    def __init__(self, spec: CacheSpec, state: State) -> None:
        self.spec = spec
        self.state = state
        self.failed = Throttled("response cache")

    def key(self, info: RequestInfo, path: str, body: bytes, model: str) -> str:
        digest = hashlib.sha256(
            path.encode() + b"\0" + model.encode() + b"\0" + body, usedforsecurity=False
        ).hexdigest()
        return f"cache:{'*' if self.spec.shared else owner(info)}:{digest}"

    async def get(self, key: str) -> Stored | None:
        try:
            data = await self.state.get(key)
        except StateUnavailable as exc:
            self.failed(exc)
            return None
        return None if data is None else Stored.decode(data)

    async def put(self, key: str, stored: Stored) -> None:
        try:
            await self.state.put(key, stored.encode(), self.spec.ttl)
        except StateUnavailable as exc:
            self.failed(exc)


def _ignore(result: str) -> None:
    return None


Run = Callable[[Send], Awaitable[None]]
Hit = Callable[[Send, Stored, HeaderList], Awaitable[None]]


class Responses:
    """The cache-and-idempotency stage (module docstring). Built by ``create_app()``
    when either is on; ``cache`` or ``idempotency`` may be None."""

    def __init__(
        self,
        spec: CacheSpec,
        cache: ResponseCache | None,
        idempotency: Any | None,  # proxy.idempotency.Idempotency
        *,
        default_model: str,
        chat_temperature: float,
        states: tuple[State, ...] = (),
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.cache = cache
        self.idempotency = idempotency
        self.default_model = default_model
        self.chat_temperature = chat_temperature
        self.states = states
        # The metrics' cache counter: hit, miss, bypass, replay (an idempotent repeat).
        self.on_result = on_result or _ignore

    def applies(self, scope: Scope) -> bool:
        """Whether :meth:`serve` has anything to do for this request: the cache is on,
        or it is a POST with an ``Idempotency-Key``."""
        return self.cache is not None or (
            self.idempotency is not None
            and scope["method"] == "POST"
            and get_header(scope["headers"], b"idempotency-key") is not None
        )

    async def serve(
        self,
        scope: Scope,
        send: Send,
        info: RequestInfo,
        body: bytes,
        path: str,
        run: Run,
        hit: Hit,
    ) -> None:
        """Answer one request whose body is read: replay, refuse, or ``run`` it (recorded).

        ``run(send)`` does the real exchange; ``hit(send, stored, headers)`` replays a
        cached answer after admission. ``path`` is the upstream path, or ``/chat``.
        """
        claim = None
        if self.idempotency is not None and scope["method"] == "POST":
            value = get_header(scope["headers"], b"idempotency-key")
            if value is not None:
                try:
                    claim = await self.idempotency.begin(info, scope["method"], path, body, value)
                except GatewayError as exc:
                    await exc.send(send)
                    return
                if isinstance(claim, Stored):
                    self.on_result("replay")
                    await claim.replay(send, [(b"idempotent-replayed", b"true")])
                    return
        try:
            await self._serve(scope, send, info, body, path, run, hit, claim)
        finally:
            if claim is not None and not claim.settled:
                await self.idempotency.release(claim)

    async def _serve(
        self,
        scope: Scope,
        send: Send,
        info: RequestInfo,
        body: bytes,
        path: str,
        run: Run,
        hit: Hit,
        claim: Any,
    ) -> None:
        key = None
        result = None
        if self.cache is not None:
            key, result, stored = await self._lookup(scope, info, body, path)
            if result is not None:
                self.on_result(result.lower() if stored is None else "hit")
            if stored is not None:
                info.cache = HIT
                age = max(int(time.time() - stored.created), 0)
                extra = [(b"x-cache", b"HIT"), (b"age", str(age).encode())]
                recorder = None
                if claim is not None:
                    recorder = Recorder(send, self.spec.max_entry_bytes, [])
                await hit(recorder or send, stored, extra)
                if claim is not None:
                    await self.idempotency.finish(claim, recorder.result())
                return
            info.cache = result
        extra = [(b"x-cache", result.encode())] if result is not None else []
        if key is None and claim is None:
            await run(with_headers(send, extra))
            return
        recorder = Recorder(send, self.spec.max_entry_bytes, extra)
        await run(recorder)
        answer = recorder.result()
        if claim is not None:
            await self.idempotency.finish(claim, answer)
        if key is not None and answer is not None:
            await self.cache.put(key, answer)

    async def _lookup(
        self, scope: Scope, info: RequestInfo, body: bytes, path: str
    ) -> tuple[str | None, str | None, Stored | None]:
        """(key to store under or None, x-cache result or None, a hit or None)."""
        if path == CHAT_PATH:
            parsed = info.json_body(body)
            upstream_path = "/chat/completions"
            if parsed is not None and "temperature" not in parsed:
                parsed = {**parsed, "temperature": self.chat_temperature}
        elif path in CACHED_PATHS:
            parsed = info.json_body(body)
            upstream_path = path
        else:
            return None, None, None
        if not reproducible(upstream_path, parsed):
            return None, BYPASS, None
        if path == CHAT_PATH and ("conversation_id" in parsed or parsed.get("store") is True):
            return None, BYPASS, None  # a conversation's turn depends on its stored history
        no_cache, no_store = cache_control(scope["headers"])
        if no_store:
            return None, BYPASS, None
        assert parsed is not None
        model = parsed.get("model")
        model = model if isinstance(model, str) else self.default_model
        assert self.cache is not None
        key = self.cache.key(info, path, body, model)
        stored = None if no_cache else await self.cache.get(key)
        return key, MISS, stored

    async def aclose(self) -> None:
        for state in self.states:
            await state.close()


class ChatCache:
    """``/chat`` inside the stage: reads the body once, then hands the app a ``receive``
    that gives it that body again (and the client's disconnect after it)."""

    def __init__(self, app: Any, responses: Responses, relay: Any) -> None:
        self.app = app
        self.responses = responses
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        info = request_info(scope)
        body = await self.relay.read_request(scope, receive, send, info)
        if body is None:
            return
        given = False

        async def again() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def run(out: Send) -> None:
            await self.app(scope, again, out)

        async def hit(out: Send, stored: Stored, extra: HeaderList) -> None:
            await self.relay.forward(
                scope, receive, out, info, body, "/chat/completions", replay=(stored, extra)
            )

        await self.responses.serve(scope, send, info, body, CHAT_PATH, run, hit)
