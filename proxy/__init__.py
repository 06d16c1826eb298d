"""vllm-wrapper: an OpenAI-compatible gateway for vLLM.

``create_app(settings)`` builds an ASGI app; ``app`` is the one built from the
environment (so ``uvicorn proxy:app`` works), created on first access.
``lifespan(gateway)`` runs a mounted gateway's lifespan inside its host app's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.config import ConfigError, Settings
from proxy.errors import GatewayError, UpstreamError
from proxy.gateway import create_app, lifespan
from proxy.version import VERSION as __version__

if TYPE_CHECKING:
    from starlette.applications import Starlette

    app: Starlette

__all__ = [
    "ConfigError",
    "GatewayError",
    "Settings",
    "UpstreamError",
    "__version__",
    "app",
    "create_app",
    "lifespan",
]


def __getattr__(name: str) -> Any:
    # Built lazily so importing the package (e.g. for create_app) reads no environment.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(f"module 'proxy' has no attribute {name!r}")
