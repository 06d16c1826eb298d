"""``GET /health`` and ``GET /models``.

``/health`` always answers HTTP 200 while the gateway itself runs (a liveness
probe), with ``status: healthy`` only when the upstream answers
``GET {VLLM_BASE_URL}/models`` with 200 within ``VLLM_WRAPPER_HEALTH_TIMEOUT``
seconds and lists ``VLLM_MODEL``; when unhealthy, ``reason`` says why in a few
words (:meth:`Upstream.probe`). ``/health?strict=1`` answers 503 when unhealthy,
for readiness probes and load balancers that look only at the status code.

With many upstreams, each one's ``/health`` is checked (concurrently) and the
answer is ``healthy`` while at least one upstream in rotation serves the default
model (``VLLM_MODEL``); ``upstreams`` lists every one (URL without credentials,
healthy, requests in flight, weight, models, last error).
"""

from __future__ import annotations

import orjson

from proxy.asgi import Receive, Scope, Send
from proxy.config import Settings
from proxy.errors import MethodNotAllowed, send_json
from proxy.passthrough import Relay
from proxy.routing.catalog import send_catalog
from proxy.routing.router import Router


class Health:
    def __init__(self, router: Router, settings: Settings) -> None:
        self.router = router
        self.model = settings.model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed("use GET /health").send(send, [(b"allow", b"GET, HEAD")])
            return
        router = self.router
        if router.single:
            endpoint = router.endpoints[0]
            ok, reason = await endpoint.upstream.probe(self.model)
            listed = [{**endpoint.snapshot(), "healthy": ok, "last_error": None if ok else reason}]
        else:
            await router.check_all()
            ok = router.serves_default()
            listed = [e.snapshot() for e in router.endpoints]
            reason = f"no upstream in rotation serves the model {self.model!r}"
        answer: dict[str, object] = {
            "status": "healthy" if ok else "unhealthy",
            "vllm_available": ok,
            "model": self.model,
            "base_url": ",".join(e.url for e in router.endpoints),
        }
        if not ok:
            answer["reason"] = reason
        if router.managed:  # many upstreams or a config file; one from the env: as before
            answer["upstreams"] = listed
        body = orjson.dumps(answer)
        strict = b"strict=1" in scope.get("query_string", b"").split(b"&")
        await send_json(
            send, 503 if strict and not ok else 200, body, [(b"cache-control", b"no-store")]
        )


class Models:
    """``GET /models``: the upstream's ``/models`` list, relayed as is (but an upstream
    401/403 is a 502 naming the gateway's key, as on ``/chat``), or with many upstreams
    the union of what the healthy ones serve."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed("use GET /models").send(send, [(b"allow", b"GET, HEAD")])
            return
        if not self.relay.router.single:
            await send_catalog(self.relay.router, "/models", send)
            return
        await self.relay(
            scope, receive, send, path="/models", query=scope["query_string"], own_api=True
        )
