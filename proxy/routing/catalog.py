"""``GET /v1/models`` (and ``/models``, ``/v1/models/{id}``) with many upstreams.

The gateway answers these itself: the union of what the upstreams in rotation
serve, in vLLM's shape (each upstream's own model objects as it listed them).
With one upstream they are relayed instead, the upstream's own bytes.
"""

from __future__ import annotations

import orjson

from proxy.asgi import Send
from proxy.errors import ModelNotFound, send_json
from proxy.routing.router import Router


async def send_catalog(router: Router, sub: str, send: Send) -> None:
    """``/models`` (the union, vLLM's list shape) or ``/models/{id}`` (one entry, or 404)."""
    models = router.served_models()
    if sub.rstrip("/") == "/models":
        await send_json(send, 200, orjson.dumps({"object": "list", "data": models}))
        return
    name = sub[len("/models/") :]
    for entry in models:
        if entry.get("id") == name:
            await send_json(send, 200, orjson.dumps(entry))
            return
    await ModelNotFound(f"The model `{name}` does not exist.", param="model").send(send)
