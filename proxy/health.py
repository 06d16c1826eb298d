"""``GET /health`` and ``GET /models``.

``/health`` always answers HTTP 200 while the gateway itself runs (a liveness
probe), with ``status: healthy`` only when the upstream answers
``GET {VLLM_BASE_URL}/models`` with 200 within ``VLLM_WRAPPER_HEALTH_TIMEOUT``
seconds and lists ``VLLM_MODEL``; when unhealthy, ``reason`` says why in a few
words (:meth:`Upstream.probe`). ``/health?strict=1`` answers 503 when unhealthy,
for readiness probes and load balancers that look only at the status code.
"""

from __future__ import annotations

import orjson

from proxy.asgi import Receive, Scope, Send
from proxy.config import Settings
from proxy.errors import MethodNotAllowed, send_json
from proxy.passthrough import Relay
from proxy.upstream import Upstream


class Health:
    def __init__(self, upstream: Upstream, settings: Settings) -> None:
        self.upstream = upstream
        self.model = settings.model
        self.base_url = settings.public_base_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed("use GET /health").send(send, [(b"allow", b"GET, HEAD")])
            return
        ok, reason = await self.upstream.probe(self.model)
        answer = {
            "status": "healthy" if ok else "unhealthy",
            "vllm_available": ok,
            "model": self.model,
            "base_url": self.base_url,
        }
        if not ok:
            answer["reason"] = reason
        body = orjson.dumps(answer)
        strict = b"strict=1" in scope.get("query_string", b"").split(b"&")
        await send_json(
            send, 503 if strict and not ok else 200, body, [(b"cache-control", b"no-store")]
        )


class Models:
    """``GET /models``: the upstream's ``/models`` list, relayed as is (but an upstream
    401/403 is a 502 naming the gateway's key, as on ``/chat``)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed("use GET /models").send(send, [(b"allow", b"GET, HEAD")])
            return
        await self.relay(
            scope, receive, send, path="/models", query=scope["query_string"], own_api=True
        )
