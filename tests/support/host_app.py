"""A host Starlette app that mounts the gateway under ``/llm`` (for the mounting tests).

Run with ``uvicorn tests.support.host_app:create_host_app --factory``; the
gateway's settings come from the environment. The host runs the gateway's
lifespan, since Starlette sends none to mounted apps.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from proxy.app import create_app
from proxy.config import Settings


def create_host_app() -> Starlette:
    gateway = create_app(Settings.from_env(env_file=""))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway.router.lifespan_context(gateway):
            yield

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("host app")

    return Starlette(
        routes=[Route("/", home), Mount("/llm", app=gateway)],
        lifespan=lifespan,
    )
