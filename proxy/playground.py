"""``GET /playground``: a chat page over ``/chat/ws`` (SPEC §11), served offline.

One HTML page, one script and one stylesheet from ``proxy/static/`` (no CDN,
no build step). Their URLs carry the ``root_path``, so the page works when the
gateway is mounted under a prefix. The page needs no API key to load: it only
talks to the API after the user types the key, which it keeps in the tab's
session storage.
"""

from __future__ import annotations

import html
from importlib import resources

from proxy.asgi import Receive, Scope, Send, route_path
from proxy.docs import refused_unless_get, send_static
from proxy.errors import NotFound

PATH = "/playground"
_STATIC = resources.files("proxy") / "static"
_ASSETS = {
    "playground.js": b"text/javascript; charset=utf-8",
    "playground.css": b"text/css; charset=utf-8",
}
PUBLIC_PATHS = (PATH, *(f"{PATH}/{name}" for name in _ASSETS))


class Playground:
    """``/playground`` and its two assets."""

    def __init__(self) -> None:
        self._page = (_STATIC / "playground.html").read_text(encoding="utf-8")
        self._files = {name: (_STATIC / name).read_bytes() for name in _ASSETS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await refused_unless_get(scope, send):
            return
        root = scope.get("root_path", "").rstrip("/")
        path = route_path(scope)
        name = path[len(PATH) + 1 :]
        if path == PATH:
            page = self._page.format(root=html.escape(root), base=html.escape(root + PATH))
            await send_static(send, page.encode(), b"text/html; charset=utf-8", b"no-cache")
        elif name in self._files:
            await send_static(send, self._files[name], _ASSETS[name], b"no-cache")
        else:
            await NotFound(f"no route for GET {path}").send(send)
