"""Bearer-token auth as a pure ASGI middleware -> the caller's :class:`~proxy.keys.Key`.

Keys are kept only as SHA-256 digests in a key ring (:mod:`proxy.keys`); the
presented token is hashed and looked up, so neither content nor length leaks
through timing. The key found is recorded on the request's ``RequestInfo``
(``info.key``) for the stages after this one (limits, logs). An expired key is a
401. The scheme is case-insensitive (``bearer`` works, as in vLLM). Paths are
matched after stripping ``root_path``, so the exemptions hold when the gateway
is mounted under a prefix. Every other request needs a key, ``OPTIONS`` included: CORS
preflights (which browsers send without credentials) are answered by the CORS
middleware outside this one when ``VLLM_WRAPPER_CORS_ORIGINS`` is set, and never reach
it or an upstream. The ring can be swapped at run time (reload).

A WebSocket with a wrong key is refused with an HTTP 401 before the upgrade.
On the paths in ``message_auth`` (``/chat/ws``) a socket without an
``Authorization`` header is let through: browsers cannot set one, so the
socket's first message must carry the key (:mod:`proxy.ws` checks it with
:func:`find_key`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from proxy.accesslog import request_info
from proxy.asgi import ASGIApp, Receive, Scope, Send, route_path
from proxy.errors import Unauthorized, deny_websocket
from proxy.keys import Key, Keys

_CHALLENGE = [(b"www-authenticate", b"Bearer")]
_MISSING = "missing API key: send 'Authorization: Bearer <key>'"


class BearerAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Keys,
        exempt: Iterable[str] = ("/health",),
        message_auth: Iterable[str] = (),
    ):
        self.app = app
        self.keys = keys
        self.exempt = frozenset(exempt)
        self.message_auth = frozenset(message_auth)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys.ring or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if route_path(scope) in self.exempt:
            await self.app(scope, receive, send)
            return
        found = self._check(scope["headers"])
        info = request_info(scope)
        if isinstance(found, Key):
            info.key = found
            info.key_name = found.name  # logs and metrics name the key, never show it
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            if route_path(scope) in self.message_auth and found == _MISSING:
                # A browser cannot set headers: the socket's first message carries the key.
                await self.app(scope, receive, send)
                return
            await deny_websocket(scope, send, Unauthorized(found), _CHALLENGE)
            return
        info.key_name = "invalid"
        await Unauthorized(found).send(send, _CHALLENGE)

    def _check(self, headers: list[tuple[bytes, bytes]]) -> Key | str:
        """The caller's key when authorized, else the reason (never echoing the key)."""
        values = [v for n, v in headers if n == b"authorization"]
        if not values:
            return _MISSING
        if len(values) > 1:
            return "more than one Authorization header"
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "Authorization must use the Bearer scheme: 'Authorization: Bearer <key>'"
        return find_key(self.keys, token.strip())


def find_key(keys: Keys, token: bytes) -> Key | str:
    """The key ``token`` is, or why it is refused (unknown, expired)."""
    key = keys.ring.find(token)
    if key is None:
        return "invalid API key"
    if key.expires is not None and time.time() >= key.expires:
        return f"API key '{key.name}' has expired"
    return key
