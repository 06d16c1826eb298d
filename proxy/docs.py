"""``GET /docs`` (Swagger UI, served offline) and ``GET /openapi.json`` (OpenAPI 3.1).

Swagger UI's files come from the ``swagger-ui-bundle-v2`` package and the page
and its start-up script from ``proxy/static/``; nothing is fetched from the
internet. Every URL in the page and the schema's ``servers`` carry the
``root_path``, so the docs work when the gateway is mounted under a prefix
(``Mount("/llm", app=create_app())``) or served with ``--root-path``.

These paths need no API key (see README, "API docs"): they describe the API,
they do not call it; "Authorize" in the page takes the key for "Try it out".
"""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from swagger_ui_bundle import swagger_ui_path

from proxy.asgi import Receive, Scope, Send, route_path
from proxy.config import Settings
from proxy.errors import MethodNotAllowed, NotFound, send_json
from proxy.openapi import build_openapi

ASSET_PREFIX = "/docs/assets/"
_STATIC = resources.files("proxy") / "static"
_ASSETS: dict[str, tuple[Any, bytes]] = {
    "swagger-ui-bundle.js": (Path(str(swagger_ui_path)), b"text/javascript; charset=utf-8"),
    "swagger-ui.css": (Path(str(swagger_ui_path)), b"text/css; charset=utf-8"),
    "favicon-32x32.png": (Path(str(swagger_ui_path)), b"image/png"),
    "docs.js": (_STATIC, b"text/javascript; charset=utf-8"),
}
PUBLIC_PATHS = ("/docs", "/openapi.json", *(ASSET_PREFIX + name for name in _ASSETS))


class Docs:
    """``/docs``, ``/openapi.json`` and ``/docs/assets/*``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._page = (_STATIC / "docs.html").read_text(encoding="utf-8")
        self._specs: dict[str, bytes] = {}
        self._files: dict[str, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await refused_unless_get(scope, send):
            return
        root = scope.get("root_path", "").rstrip("/")
        path = route_path(scope)
        if path == "/openapi.json":
            spec = self._specs.get(root)
            if spec is None:
                spec = self._specs[root] = orjson.dumps(build_openapi(self.settings, root))
            await send_json(send, 200, spec)
        elif path == "/docs":
            page = self._page.format(
                assets=html.escape(root + ASSET_PREFIX.rstrip("/")),
                spec=html.escape(root + "/openapi.json"),
            ).encode()
            await send_static(send, page, b"text/html; charset=utf-8", b"no-cache")
        elif path.startswith(ASSET_PREFIX) and path[len(ASSET_PREFIX) :] in _ASSETS:
            name = path[len(ASSET_PREFIX) :]
            folder, kind = _ASSETS[name]
            body = self._files.get(name)
            if body is None:
                body = self._files[name] = (folder / name).read_bytes()
            await send_static(send, body, kind, b"public, max-age=86400")
        else:
            await NotFound(f"no route for GET {path}").send(send)


async def refused_unless_get(scope: Scope, send: Send) -> bool:
    """Answer 405 to a method other than GET or HEAD; True when it did."""
    if scope["method"] in ("GET", "HEAD"):
        return False
    await MethodNotAllowed("use GET").send(send, [(b"allow", b"GET, HEAD")])
    return True


async def send_static(send: Send, body: bytes, content_type: bytes, cache: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", cache),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
