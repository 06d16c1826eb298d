"""``GET /chat/ws``: ``/chat`` over one long-lived WebSocket (SPEC §11).

Every message is one JSON object with a ``type``. The client sends::

    {"type": "auth", "api_key": "..."}            first, only when no Authorization header
    {"type": "chat", "id": "a1", "messages": [...], "model"?, "max_tokens"?, ...}
    {"type": "cancel", "id": "a1"}
    {"type": "ping"}

and the server answers, per ``id``::

    {"type": "delta", "id": "a1", "content": "Hel"}            (any number)
    {"type": "done", "id": "a1", "usage": {...}, "finish_reason": "stop", "model": "..."}
    {"type": "error", "id": "a1", "status": 400, "error": {"message", "type", "param", "code"}}

plus ``{"type": "ready"}`` once the socket is authorized, ``{"type": "pong"}`` for a
``ping`` and ``{"type": "ping"}`` when it has been idle for
``VLLM_WRAPPER_WS_PING_INTERVAL`` (keeps proxies and load balancers from closing it).
A cancelled answer ends with ``done`` and ``"finish_reason": "cancelled"``.

A chat turn is :class:`proxy.chat.ChatCore`'s, exactly as ``POST /chat`` with
``"stream": true``: same validation, translator, retries and upstream, so
whatever that core does for a turn (limits, history, metrics) holds here too.
Turns run concurrently by ``id`` (at most ``VLLM_WRAPPER_WS_MAX_REQUESTS``);
``cancel`` or closing the socket closes their upstream requests at once.

The server sends one message at a time; a turn waits for its message to go out
before it reads more from the upstream (so the upstream is read no faster than
the client reads, and at most one message per turn waits). A send that does not
finish within ``VLLM_WRAPPER_WS_SEND_TIMEOUT`` closes the socket with 1008 and
its upstream requests: a client that stops reading costs bounded memory.
Bad messages (not JSON, unknown type, over ``VLLM_WRAPPER_MAX_BODY_BYTES``) get an
``error`` message and the socket stays open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit

import orjson

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Receive, Scope, Send
from proxy.auth import find_key
from proxy.chat import ChatCore, Delta, Done, Failed
from proxy.chatrequest import InvalidChat
from proxy.config import Settings
from proxy.errors import (
    BadRequest,
    ClientError,
    Forbidden,
    PayloadTooLarge,
    Unauthorized,
    deny_websocket,
    error_body,
    send_json,
)
from proxy.headers import get_header, request_id_from
from proxy.keys import Key, Keys

log = logging.getLogger(__name__)
access = logging.getLogger("proxy.access")

POLICY_VIOLATION = 1008
_PING = orjson.dumps({"type": "ping"}).decode()
_PONG = orjson.dumps({"type": "pong"}).decode()
_READY = orjson.dumps({"type": "ready"}).decode()
_MAX_ID = 128


class ChatSocket:
    """The ``/chat/ws`` ASGI app: checks the handshake, then serves one :class:`_Session`."""

    def __init__(self, core: ChatCore, settings: Settings, keys: Keys) -> None:
        self.core = core
        self.settings = settings
        self.origins = frozenset(settings.cors_origins)
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            body = error_body(
                "/chat/ws is a WebSocket endpoint: connect with a WebSocket client "
                "(or use POST /chat)",
                "invalid_request_error",
                "upgrade_required",
            )
            await send_json(send, 426, body, [(b"upgrade", b"websocket")])
            return
        problem = self._origin_problem(scope["headers"])
        if problem is not None:
            await deny_websocket(scope, send, Forbidden(problem, code="origin_not_allowed"))
            return
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        # The auth middleware let a socket without a header through only on this path.
        needs_auth = bool(self.keys.ring) and not get_header(scope["headers"], b"authorization")
        session = _Session(self, receive, send, scope["headers"], request_info(scope).key)
        await session.serve(needs_auth)

    def _origin_problem(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """A browser's socket must come from this gateway's origin or an allowed one."""
        origin = get_header(headers, b"origin")
        if origin is None:
            return None  # not a browser: nothing to forge
        text = origin.decode("latin-1")
        if "*" in self.origins or text in self.origins:
            return None
        host = get_header(headers, b"host")
        if host is not None and urlsplit(text).netloc == host.decode("latin-1"):
            return None
        return f"origin {text!r} may not open /chat/ws; allow it with VLLM_WRAPPER_CORS_ORIGINS"

    def accepts(self, key: object) -> Key | str:
        """The key an ``auth`` message names, or why it is refused."""
        if not isinstance(key, str) or not key.strip():
            return "invalid API key"
        return find_key(self.keys, key.strip().encode())


class _Session:
    """One open socket: a reader task, a watchdog task and one task per running turn."""

    def __init__(
        self,
        app: ChatSocket,
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        key: Key | None,
    ) -> None:
        self.headers = headers  # the handshake's (session affinity)
        self.key = key  # the caller's (header or auth message); limits apply per turn
        self.core = app.core
        self.app = app
        self.settings = app.settings
        self.receive = receive
        self.send = send
        # One send at a time; a turn waits for its turn to send (at most one message each).
        self.lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self.sending_since: float | None = None
        self.last_sent = self.loop.time()
        self.turns: dict[str | int, asyncio.Task[None]] = {}
        self.cancelled: set[str | int] = set()
        self.counter = 0

    async def serve(self, needs_auth: bool) -> None:
        if needs_auth and not await self._authenticate():
            return
        await self._emit(_READY)
        reader = asyncio.ensure_future(self._read())
        watchdog = asyncio.ensure_future(self._watch())
        try:
            await asyncio.wait((reader, watchdog), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, watchdog, *self.turns.values()):
                task.cancel()
            await asyncio.gather(reader, watchdog, *self.turns.values(), return_exceptions=True)
        if watchdog.done() and not watchdog.cancelled() and watchdog.exception() is None:
            await self._close(POLICY_VIOLATION, "client too slow: messages were not read")

    async def _emit(self, text: str) -> None:
        """Send one message; waits while another is being sent (the watchdog bounds that)."""
        async with self.lock:
            self.sending_since = self.loop.time()
            await self.send({"type": "websocket.send", "text": text})
            self.sending_since = None
            self.last_sent = self.loop.time()

    async def _watch(self) -> None:
        """Returns when a send has been stuck for the send timeout; pings an idle socket.

        One timer per socket instead of one per message: it checks a few times per
        period whether the send in progress began too long ago.
        """
        limit = self.settings.ws_send_timeout
        ping = self.settings.ws_ping_interval
        tick = min(limit, ping or limit) / 4
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            since = self.sending_since
            if since is not None and now - since > limit:
                log.warning("closing /chat/ws: the client read nothing for %gs", limit)
                return
            if ping and since is None and now - self.last_sent >= ping and not self.lock.locked():
                try:
                    async with asyncio.timeout(limit):
                        await self._emit(_PING)
                except TimeoutError:
                    log.warning("closing /chat/ws: the client read nothing for %gs", limit)
                    return

    async def _close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self.send({"type": "websocket.close", "code": code, "reason": reason})
        except (TimeoutError, OSError, RuntimeError):
            pass  # the connection is gone or stuck; returning lets the server drop it

    async def _authenticate(self) -> bool:
        """The first message must be ``{"type": "auth", "api_key": ...}`` within the timeout."""
        problem = "send {'type': 'auth', 'api_key': ...} first (or an Authorization header)"
        try:
            async with asyncio.timeout(self.settings.ws_auth_timeout):
                message = await self.receive()
        except TimeoutError:
            problem = f"no auth message within {self.settings.ws_auth_timeout:g} s"
            message = None
        if message is not None:
            if message["type"] == "websocket.disconnect":
                return False
            data = _decode(message)
            if isinstance(data, dict) and data.get("type") == "auth":
                found = self.app.accepts(data.get("api_key"))
                if isinstance(found, Key):
                    self.key = found
                    return True
                problem = found
        body = Unauthorized(problem).body()
        text = _event("error", None, status=401, error=orjson.loads(body)["error"])
        try:
            await self.send({"type": "websocket.send", "text": text})
        except OSError:
            return False
        await self._close(POLICY_VIOLATION, "unauthorized")
        return False

    async def _read(self) -> None:
        limit = self.settings.max_body_bytes
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            if len(raw) > limit:
                too_big = PayloadTooLarge(
                    f"message over {limit} bytes (VLLM_WRAPPER_MAX_BODY_BYTES)"
                )
                await self._error(None, too_big)
                continue
            data = _decode(message)
            if not isinstance(data, dict):
                await self._error(
                    None, BadRequest("send one JSON object per message", code="invalid_json")
                )
                continue
            kind = data.get("type")
            if kind == "chat":
                await self._start(data)
            elif kind == "cancel":
                await self._cancel(data.get("id"))
            elif kind == "ping":
                await self._emit(_PONG)
            elif kind == "auth":
                continue  # already authorized (header or earlier message)
            else:
                await self._error(
                    data.get("id") if _valid_id(data.get("id")) else None,
                    BadRequest(
                        f"unknown message type {kind!r}; expected chat, cancel, ping or auth",
                        param="type",
                        code="unknown_type",
                    ),
                )

    async def _start(self, data: dict[str, Any]) -> None:
        turn_id = data.pop("id", None)
        data.pop("type")
        if turn_id is None:
            self.counter += 1
            turn_id = f"chat-{self.counter}"
        elif not _valid_id(turn_id):
            await self._error(
                None,
                BadRequest("'id' must be a string or an integer", param="id", code="invalid_id"),
            )
            return
        if turn_id in self.turns:
            await self._error(
                turn_id,
                BadRequest(f"id {turn_id!r} is still running", param="id", code="duplicate_id"),
            )
            return
        if len(self.turns) >= self.settings.ws_max_requests:
            await self._error(
                turn_id,
                ClientError(
                    f"at most {self.settings.ws_max_requests} requests may run at once on one "
                    "socket (VLLM_WRAPPER_WS_MAX_REQUESTS)",
                    code="too_many_requests",
                ),
            )
            return
        data["stream"] = True  # a socket always streams
        try:
            turn = self.core.turn(data, self.headers)
        except InvalidChat as exc:
            await self._error(turn_id, exc)
            return
        self.turns[turn_id] = asyncio.ensure_future(self._run(turn_id, turn))

    async def _cancel(self, turn_id: object) -> None:
        task = self.turns.get(turn_id) if _valid_id(turn_id) else None  # type: ignore[arg-type]
        if task is None:
            await self._error(
                turn_id if _valid_id(turn_id) else None,
                BadRequest(
                    f"no running request with id {turn_id!r}", param="id", code="not_running"
                ),
            )
            return
        self.cancelled.add(turn_id)  # type: ignore[arg-type]
        task.cancel()

    async def _run(self, turn_id: str | int, turn: Any) -> None:
        info = RequestInfo(request_id_from(()))
        info.key = self.key
        info.key_name = self.key.name if self.key is not None else None
        outcome = "cancelled"
        try:
            async with aclosing(self.core.run(turn, info)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        await self._emit(_event("delta", turn_id, content=event.text))
                    elif isinstance(event, Done):
                        outcome = "done"
                        await self._emit(
                            _event(
                                "done",
                                turn_id,
                                usage=event.usage,
                                finish_reason=event.finish_reason,
                                model=event.model,
                                **_conversation(event),
                            )
                        )
                    elif isinstance(event, Failed):
                        outcome = f"error:{event.status}"
                        await self._emit(_failed(turn_id, event.status, event.body))
        except OSError:
            info.note = "client-disconnected"  # the reader sees the disconnect and ends
        except asyncio.CancelledError:
            if turn_id not in self.cancelled:
                raise  # the socket is closing
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            info.note = "cancelled"
            await self._emit(
                _event("done", turn_id, usage=None, finish_reason="cancelled", model=turn.model)
            )
        finally:
            self.turns.pop(turn_id, None)
            self.cancelled.discard(turn_id)
            if self.settings.access_log and access.isEnabledFor(logging.INFO):
                access.info(
                    "WS /chat/ws %s upstream=%s dur=%.1fms attempts=%d id=%s%s",
                    outcome,
                    "-" if info.upstream_ms is None else f"{info.upstream_ms:.1f}ms",
                    (time.perf_counter() - info.started) * 1000,
                    info.attempts,
                    info.request_id.decode("latin-1"),
                    f" {info.note}" if info.note else "",
                )

    async def _error(self, turn_id: str | int | None, exc: ClientError) -> None:
        await self._emit(_failed(turn_id, exc.status, exc.body()))


def _decode(message: dict[str, Any]) -> Any:
    raw = message.get("text")
    if raw is None:
        raw = message.get("bytes") or b""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID


def _event(kind: str, turn_id: str | int | None, **fields: Any) -> str:
    return orjson.dumps({"type": kind, "id": turn_id, **fields}).decode()


def _failed(turn_id: str | int | None, status: int, body: bytes) -> str:
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        error = {"message": body.decode("utf-8", "replace"), "type": "upstream_error"}
    return _event("error", turn_id, status=status, error=error)


def _conversation(done: Done) -> dict[str, str]:
    """``conversation_id`` for a ``done`` event when the turn was stored."""
    return {} if done.conversation_id is None else {"conversation_id": done.conversation_id}
