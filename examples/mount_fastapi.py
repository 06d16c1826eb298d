"""The gateway mounted under ``/llm`` inside a FastAPI app.

Run: ``uvicorn examples.mount_fastapi:app --port 8000`` (settings from the environment,
as for ``python -m proxy``). The gateway answers on ``/llm/health``, ``/llm/v1/...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

import proxy

gateway = proxy.create_app()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # FastAPI runs no lifespan of mounted apps either: enter the gateway's here.
    async with proxy.lifespan(gateway):
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/llm", gateway)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"app": "host"}
