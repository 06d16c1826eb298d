"""Bearer-token auth as a pure ASGI middleware.

The key is kept only as a SHA-256 digest and compared with
``secrets.compare_digest`` on digests, so neither content nor length leaks
through timing. The scheme is case-insensitive (``bearer`` works, as in
vLLM). Paths are matched after stripping ``root_path``, so the exemptions
hold when the gateway is mounted under a prefix. CORS preflights (OPTIONS
with ``Access-Control-Request-Method``) pass, as browsers send them without
credentials.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from proxy.accesslog import request_info
from proxy.asgi import ASGIApp, Receive, Scope, Send, route_path
from proxy.errors import Unauthorized

_CHALLENGE = [(b"www-authenticate", b"Bearer")]


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str, exempt: Iterable[str] = ("/health",)):
        self.app = app
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
        # The key's name for logs and metrics: the one key of VLLM_WRAPPER_API_KEY is "default".
        request_info(scope).key_name = "invalid" if problem else "default"
        if problem is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await Unauthorized(problem).send(send, _CHALLENGE)

    def _check(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """None when authorized, else the reason (never echoing the key)."""
        values = [v for n, v in headers if n == b"authorization"]
        if not values:
            return "missing API key: send 'Authorization: Bearer <key>'"
        if len(values) > 1:
            return "more than one Authorization header"
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "Authorization must use the Bearer scheme: 'Authorization: Bearer <key>'"
        digest = hashlib.sha256(token.strip()).digest()
        if not secrets.compare_digest(digest, self._digest):
            return "invalid API key"
        return None


def _is_preflight(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "OPTIONS":
        return False
    return any(n == b"access-control-request-method" for n, _ in scope["headers"])
