"""Bearer-token auth as a pure ASGI middleware.

The key is kept only as a SHA-256 digest and compared with
``secrets.compare_digest`` on digests, so neither content nor length leaks
through timing. The scheme is case-insensitive (``bearer`` works, as in
vLLM). Paths are matched after stripping ``root_path``, so the exemptions
hold when the gateway is mounted under a prefix. CORS preflights (OPTIONS
with ``Access-Control-Request-Method``) pass, as browsers send them without
credentials.

A WebSocket with a wrong key is refused with an HTTP 401 before the upgrade.
On the paths in ``message_auth`` (``/chat/ws``) a socket without an
``Authorization`` header is let through: browsers cannot set one, so the
socket's first message must carry the key (:mod:`proxy.ws` checks it).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from proxy.asgi import ASGIApp, Receive, Scope, Send, route_path
from proxy.errors import Unauthorized, deny_websocket

_CHALLENGE = [(b"www-authenticate", b"Bearer")]
_MISSING = "missing API key: send 'Authorization: Bearer <key>'"


class BearerAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str,
        exempt: Iterable[str] = ("/health",),
        message_auth: Iterable[str] = (),
    ):
        self.app = app
        self.message_auth = frozenset(message_auth)
        self.enabled = bool(api_key)
        self._digest = hashlib.sha256(api_key.encode()).digest()
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if route_path(scope) in self.exempt or _is_preflight(scope):
            await self.app(scope, receive, send)
            return
        problem = self._check(scope["headers"])
        if problem is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            if route_path(scope) in self.message_auth and problem == _MISSING:
                # A browser cannot set headers: the socket's first message carries the key.
                await self.app(scope, receive, send)
                return
            await deny_websocket(scope, send, Unauthorized(problem), _CHALLENGE)
            return
        await Unauthorized(problem).send(send, _CHALLENGE)

    def _check(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """None when authorized, else the reason (never echoing the key)."""
        values = [v for n, v in headers if n == b"authorization"]
        if not values:
            return _MISSING
        if len(values) > 1:
            return "more than one Authorization header"
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "Authorization must use the Bearer scheme: 'Authorization: Bearer <key>'"
        if not key_matches(token.strip(), self._digest):
            return "invalid API key"
        return None


def key_matches(token: bytes, digest: bytes) -> bool:
    """Whether ``token`` is the key whose SHA-256 digest is ``digest`` (constant time)."""
    return secrets.compare_digest(hashlib.sha256(token).digest(), digest)


def _is_preflight(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "OPTIONS":
        return False
    return any(n == b"access-control-request-method" for n, _ in scope["headers"])
