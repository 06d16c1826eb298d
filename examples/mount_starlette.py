"""The gateway mounted under ``/llm`` inside a Starlette app.

Run: ``uvicorn examples.mount_starlette:app --port 8000`` (settings from the environment,
as for ``python -m proxy``). The gateway answers on ``/llm/health``, ``/llm/v1/...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import proxy

gateway = proxy.create_app()  # or create_app(Settings(base_url=..., ...))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Mounted apps get no lifespan events: run the gateway's (its connection pool) here.
    async with proxy.lifespan(gateway):
        yield


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"app": "host"})


app = Starlette(
    routes=[Route("/hello", hello), Mount("/llm", app=gateway)],
    lifespan=lifespan,
)
