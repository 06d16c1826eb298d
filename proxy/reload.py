"""Reloading the configuration file: ``SIGHUP`` and ``POST /admin/reload``.

One mechanism for every stage: the whole file is read and checked again, then each
stage that registered a *prepare* step checks its part (``prepare(config)`` raises
:class:`ConfigError` and changes nothing) and returns its *commit* step; only when
every stage accepted are the commits run. So a bad file changes nothing: it is
refused with one log line and the running configuration stays.

With ``--workers N`` the uvicorn parent forwards ``SIGHUP`` to every worker
(:mod:`proxy.cli`), and ``POST /admin/reload`` in one worker checks the file and
then signals the parent, so every worker reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson

from proxy.accesslog import request_info
from proxy.asgi import Receive, Scope, Send
from proxy.config import ConfigError
from proxy.configfile import FileConfig, load
from proxy.errors import BadRequest, Forbidden, MethodNotAllowed, send_json

log = logging.getLogger(__name__)

Commit = Callable[[], Awaitable[None]]
Prepare = Callable[[FileConfig], Commit]

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class Reloader:
    """Re-reads the file at ``path`` and hands it to the registered stages, all or nothing."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stages: list[Prepare] = []
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[str | None]] = set()

    def register(self, prepare: Prepare) -> None:
        self._stages.append(prepare)

    def check(self) -> FileConfig:
        """Read and check the file (raises :class:`ConfigError`), changing nothing."""
        return load(self.path)

    async def reload(self) -> str | None:
        """Apply the file as it is now. Returns None, or the one-line reason it was refused."""
        async with self._lock:
            try:
                config = load(self.path)
                commits = [prepare(config) for prepare in self._stages]
            except ConfigError as exc:
                log.error("config reload refused, the running configuration stays: %s", exc)
                return str(exc)
            for commit in commits:
                await commit()
            log.info("config reloaded from %s", self.path)
            return None

    @contextlib.asynccontextmanager
    async def on_sighup(self) -> AsyncIterator[None]:
        """While inside, ``SIGHUP`` reloads (where this loop may own signals: main thread)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    def _reload_soon(self) -> None:
        log.info("SIGHUP: reloading %s", self.path)
        task = asyncio.ensure_future(self.reload())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def signal_parent() -> None:
    """Ask the uvicorn parent (``--workers N``) to forward ``SIGHUP`` to every worker."""
    os.kill(os.getppid(), signal.SIGHUP)


class AdminReload:
    """``POST /admin/reload``: reload the configuration file now.

    It needs an admin key (those of ``VLLM_WRAPPER_API_KEY``, or ``admin = true`` in the
    file; the bearer middleware has identified it); with auth off
    it is refused (403) unless the request comes from the loopback interface.
    """

    def __init__(
        self,
        reloader: Reloader | None,
        *,
        auth_on: bool,
        fan_out: Callable[[], None] | None = None,
    ) -> None:
        self.reloader = reloader
        self.auth_on = auth_on
        self.fan_out = fan_out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await MethodNotAllowed("use POST /admin/reload").send(send, [(b"allow", b"POST")])
            return
        client = scope.get("client")
        if self.auth_on:
            key = request_info(scope).key
            if key is None or not key.admin:
                await Forbidden("reload needs an admin key", code="admin_required").send(send)
                return
        elif client is None or client[0] not in _LOOPBACK:
            await Forbidden(
                "reload over HTTP needs VLLM_WRAPPER_API_KEY set, or a request from loopback"
            ).send(send)
            return
        if self.reloader is None:
            await BadRequest(
                "no configuration file to reload (start with --config or VLLM_WRAPPER_CONFIG)",
                code="no_config_file",
            ).send(send)
            return
        if self.fan_out is not None:
            try:
                self.reloader.check()
            except ConfigError as exc:
                log.error("config reload refused, the running configuration stays: %s", exc)
                await BadRequest(str(exc), code="invalid_config").send(send)
                return
            self.fan_out()
            body = {"status": "reloading", "path": self.reloader.path, "workers": "all"}
            await send_json(send, 202, orjson.dumps(body))
            return
        problem = await self.reloader.reload()
        if problem is not None:
            await BadRequest(problem, code="invalid_config").send(send)
            return
        await send_json(send, 200, orjson.dumps({"status": "reloaded", "path": self.reloader.path}))
