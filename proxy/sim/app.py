"""The simulated vLLM server as a pure ASGI app.

Routing, API key, the ``/_sim/*`` control API and the generation loop live
here; wire formats, validation, text and faults come from the leaf modules.
Per-request state stays in locals; the app holds only options, counters and
pending faults.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from . import embed, errors, tokenizer, wire
from .errors import SimError
from .faults import FaultError, Faults, FaultState
from .generate import Plan, compose, filler, make_plan, rng_for
from .options import VLLM_VERSION, SimOptions
from .stats import Stats
from .validate import (
    EMBEDDING_FIELDS,
    REQUIRED,
    TOKENIZE_FIELDS,
    GenRequest,
    chat_messages,
    chat_request,
    check_fields,
    completion_request,
    parse_body,
    prompt_list,
    resolve_model,
)

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GARBAGE = b"<html>\x00\xff\xfe this is not an event stream }{\r\n\r\nevent\x01: ???\n"
_YIELD_EVERY = 32  # with no token delay, let other streams run now and then
_WAITABLE = (
    "aborted",
    "completed",
    "dropped",
    "requests",
    "open_streams",
    "waiting",
    "generation_tokens",
)


class SimulatedDrop(Exception):
    """Raised inside the app to make the server cut the connection mid-body."""


class _ClientGone(Exception):
    """The client disconnected while a generation was running."""


class _DropLogFilter(logging.Filter):
    """Keep uvicorn from logging a traceback for a drop the test asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedDrop)


def _install_log_filter() -> None:
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropLogFilter) for f in log.filters):
        log.addFilter(_DropLogFilter())


class Disconnect:
    """Watches ``receive`` for ``http.disconnect`` while a generation runs."""

    __slots__ = ("_event", "_task", "gone")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._event = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self._event.set()
                return

    async def pause(self, seconds: float) -> None:
        """Sleep, but raise :class:`_ClientGone` as soon as the client leaves."""
        if self.gone:
            raise _ClientGone
        if seconds <= 0:
            return
        if seconds <= 0.05:
            await asyncio.sleep(seconds)  # cheap path for per-token delays
        else:
            try:
                await asyncio.wait_for(self._event.wait(), seconds)
            except TimeoutError:
                return
        if self.gone:
            raise _ClientGone

    def close(self) -> None:
        self._task.cancel()


@dataclass(slots=True)
class Request:
    """One HTTP request as the handlers see it."""

    path: str
    method: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    content_type: str
    receive: Receive
    send: Send
    faults: Faults


Handler = Callable[[Request], Awaitable[None]]


async def send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": wire.json_headers(body, extra)}
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, err: SimError) -> None:
    await send_json(send, err.status, err.body, err.headers)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or ``None`` if the client left first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _rid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class SimApp:
    """A vLLM 0.32 OpenAI-compatible server that makes up its answers."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.stats = Stats()
        self.faults = FaultState()
        self._slots = asyncio.Semaphore(options.max_running) if options.max_running else None
        self.fingerprint = wire.fingerprint(options.models, options.max_model_len)
        self._key = hashlib.sha256(options.api_key.encode()).digest() if options.api_key else None
        self._routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self._health},
            "/ping": {"GET": self._health, "POST": self._health},
            "/version": {"GET": self._version},
            "/metrics": {"GET": self._metrics},
            "/tokenize": {"POST": self._tokenize},
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/_sim/faults": {"GET": self._get_faults, "POST": self._set_faults},
            "/_sim/reset": {"POST": self._reset},
            "/_sim/stats": {"GET": self._stats},
            "/_sim/wait_aborted": {"GET": self._wait_aborted},
            "/_sim/wait": {"GET": self._wait},
        }
        if options.embeddings:
            self._routes["/v1/embeddings"] = {"POST": self._embeddings}
        _install_log_filter()

    # -- ASGI entry ------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        body = await read_body(receive)
        if body is None:
            return
        content_type = ""
        auth: bytes | None = None
        sim: dict[bytes, bytes] = {}
        own = False  # a gateway's own poll: the counted faults ("fail the next N") skip it
        for name, value in headers:
            if name == b"user-agent":
                own = value.startswith(b"vllm-wrapper/")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"authorization":
                auth = value
            elif name.startswith(b"x-sim-"):
                sim[name] = value
        faults = Faults()
        if path.startswith("/v1/") or path == "/v1":
            self.stats.received(path, method, headers, body)
            if self._key is not None and method != "OPTIONS" and not self._authorized(auth):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-length", str(len(errors.UNAUTHORIZED)).encode()),
                            (b"content-type", wire.JSON_TYPE),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": errors.UNAUTHORIZED})
                return
            faults = self.faults.take(sim, counted=not own)
            if faults.first_byte_delay > 0:
                await asyncio.sleep(faults.first_byte_delay)
            if faults.fail_status is not None:
                await self._fail(send, faults)
                return
        methods = self._routes.get(path)
        if methods is None:
            await send_json(send, 404, errors.NOT_FOUND)
            return
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(methods).encode()
            await send_json(send, 405, errors.METHOD_NOT_ALLOWED, [(b"allow", allow)])
            return
        request = Request(
            path,
            method,
            scope.get("query_string", b""),
            headers,
            body,
            content_type,
            receive,
            send,
            faults,
        )
        await handler(request)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, auth: bytes | None) -> bool:
        if auth is None or self._key is None:
            return False
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return secrets.compare_digest(hashlib.sha256(token.strip()).digest(), self._key)

    async def _fail(self, send: Send, faults: Faults) -> None:
        assert faults.fail_status is not None
        err = errors.status_error(faults.fail_status)
        body = faults.fail_body if faults.fail_body is not None else err.body
        extra = (
            [] if faults.retry_after is None else [(b"retry-after", faults.retry_after.encode())]
        )
        await send_json(send, faults.fail_status, body, extra)

    # -- plain endpoints ----------------------------------------------------------

    async def _health(self, req: Request) -> None:
        await req.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"0"), wire.VARY],
            }
        )
        await req.send({"type": "http.response.body", "body": b""})

    async def _version(self, req: Request) -> None:
        await send_json(req.send, 200, orjson.dumps({"version": VLLM_VERSION}))

    async def _metrics(self, req: Request) -> None:
        body = self.stats.metrics(self.options.models[0], self.options.max_running)
        headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", wire.METRICS_TYPE),
            wire.VARY,
        ]
        await req.send({"type": "http.response.start", "status": 200, "headers": headers})
        await req.send({"type": "http.response.body", "body": body})

    async def _models(self, req: Request) -> None:
        opts = self.options
        perms = [secrets.token_hex(8) for _ in opts.models]
        body = wire.models_body(opts.models, opts.max_model_len, int(time.time()), perms)
        await send_json(req.send, 200, body)

    async def _tokenize(self, req: Request) -> None:
        try:
            data = parse_body(req.content_type, req.body)
            f = check_fields(data, TOKENIZE_FIELDS, REQUIRED["tokenize"])
            resolve_model(f.get("model"), self.options.models)
            strs: list[str] | None = None
            if "messages" in f:
                ids = tokenizer.encode_chat(chat_messages(f["messages"]))
            elif "prompt" in f:
                pieces = tokenizer.split(f["prompt"])
                ids = [tokenizer.token_id(p) for p in pieces]
                strs = pieces if f.get("return_token_strs") else None
            else:
                raise errors.validation_error(
                    [
                        {
                            "type": "missing",
                            "loc": "body.prompt",
                            "msg": "Field required",
                            "input": errors.input_repr(data),
                        }
                    ]
                )
        except SimError as err:
            await send_error(req.send, err)
            return
        body = orjson.dumps(
            {
                "count": len(ids),
                "max_model_len": self.options.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )
        await send_json(req.send, 200, body)

    async def _embeddings(self, req: Request) -> None:
        try:
            data = parse_body(req.content_type, req.body)
            f = check_fields(data, EMBEDDING_FIELDS, REQUIRED["embedding"])
            model = resolve_model(f.get("model"), self.options.models)
            inputs = prompt_list(f["input"])
            longest = max(n for _, n in inputs)
            if longest > self.options.max_model_len:
                raise errors.bad_request(
                    f"This model's maximum context length is {self.options.max_model_len} tokens. "
                    f"However, you requested {longest} tokens in the input for embedding "
                    f"generation. Please reduce the length of the input.",
                    "input_tokens",
                )
            dim = f.get("dimensions") or embed.DEFAULT_DIM
            if not 1 <= dim <= 4096:
                raise errors.bad_request(
                    f"dimensions must be between 1 and 4096, got {dim}.", "dimensions"
                )
        except SimError as err:
            await send_error(req.send, err)
            return
        self.stats.started(sum(n for _, n in inputs))
        body = embed.embeddings_body(
            rid=_rid("embd"),
            created=int(time.time()),
            model=model,
            inputs=inputs,
            dim=dim,
            b64=f.get("encoding_format") == "base64",
        )
        await send_json(req.send, 200, body)
        self.stats.ended("completed")

    # -- generation -------------------------------------------------------------

    async def _chat(self, req: Request) -> None:
        await self._generate(req, chat=True)

    async def _completions(self, req: Request) -> None:
        await self._generate(req, chat=False)

    def _plans(self, g: GenRequest, faults: Faults) -> list[Plan]:
        forced = faults.tokens if faults.tokens is not None else self.options.tokens
        if forced is None and g.ignore_eos:
            forced = g.limit
        plans = []
        for text in g.prompts:
            for i in range(g.n):
                rng = rng_for(text, g.temperature, g.seed, i)
                answer, cjk = compose(text, rng, chat=g.kind == "chat")
                plans.append(
                    make_plan(
                        answer,
                        filler(rng, cjk),
                        limit=g.limit,
                        forced=forced,
                        stops=g.stops,
                        include_stop=g.include_stop,
                    )
                )
        return plans

    async def _generate(self, req: Request, *, chat: bool) -> None:
        opts = self.options
        try:
            data = parse_body(req.content_type, req.body)
            build = chat_request if chat else completion_request
            g = build(data, opts.models, opts.max_model_len)
        except SimError as err:
            await send_error(req.send, err)
            return
        faults = req.faults
        self.faults.take_generation(faults, g.stream)
        if faults.garbage:
            await req.send(
                {"type": "http.response.start", "status": 200, "headers": wire.SSE_HEADERS}
            )
            await req.send({"type": "http.response.body", "body": GARBAGE})
            return
        plans = self._plans(g, faults)
        prompt_tokens = g.prompt_tokens[0] if chat else sum(g.prompt_tokens)
        delay = faults.token_delay if faults.token_delay is not None else opts.token_delay
        if self._slots is not None:  # queue like vLLM's scheduler when the batch is full
            self.stats.queued(1)
            try:
                await self._slots.acquire()
            finally:
                self.stats.queued(-1)
        watch = Disconnect(req.receive)
        self.stats.started(prompt_tokens)
        outcome = "aborted"
        sent = [0]
        try:
            if g.stream:
                await self._stream(
                    req.send, g, plans, prompt_tokens, delay, watch, faults, sent, chat=chat
                )
            else:
                await self._unary(req.send, g, plans, prompt_tokens, delay, watch, chat=chat)
                sent[0] = sum(len(p.pieces) for p in plans)
            outcome = "completed"
        except _ClientGone:
            logger.debug("client disconnected; generation aborted")
        except SimulatedDrop:
            outcome = "dropped"
            raise
        finally:
            watch.close()
            self.stats.generation_tokens += sent[0]
            self.stats.ended(outcome, [p.finish_reason for p in plans])
            if self._slots is not None:
                self._slots.release()

    async def _unary(
        self,
        send: Send,
        g: GenRequest,
        plans: list[Plan],
        prompt_tokens: int,
        delay: float,
        watch: Disconnect,
        *,
        chat: bool,
    ) -> None:
        steps = max(len(p.pieces) for p in plans)
        await watch.pause(self.options.first_token_delay + delay * (steps - 1))
        common = {
            "created": int(time.time()),
            "model": g.model,
            "fingerprint": self.fingerprint,
            "plans": plans,
            "prompt_tokens": prompt_tokens,
        }
        if chat:
            body = wire.chat_body(
                rid=_rid("chatcmpl"), logprobs=g.logprobs, top_logprobs=g.top_logprobs, **common
            )
        else:
            body = wire.completion_body(rid=_rid("cmpl"), **common)
        if watch.gone:
            raise _ClientGone
        await send_json(send, 200, body)

    async def _stream(
        self,
        send: Send,
        g: GenRequest,
        plans: list[Plan],
        prompt_tokens: int,
        delay: float,
        watch: Disconnect,
        faults: Faults,
        sent: list[int],
        *,
        chat: bool,
    ) -> None:
        framer = wire.StreamFramer(
            chat=chat,
            rid=_rid("chatcmpl" if chat else "cmpl"),
            created=int(time.time()),
            model=g.model,
            fingerprint=self.fingerprint,
            include_usage=g.include_usage,
            logprobs=g.logprobs,
            top_logprobs=g.top_logprobs,
        )
        drop = faults.drop_after
        stall = faults.stall_after
        events = 0

        async def emit(data: bytes) -> None:
            nonlocal events
            if events == drop:
                logger.info("sim: cutting the connection after %d events", events)
                raise SimulatedDrop
            await send({"type": "http.response.body", "body": data, "more_body": True})
            events += 1
            if events == stall:
                await watch.pause(faults.stall_seconds)

        await send({"type": "http.response.start", "status": 200, "headers": wire.SSE_HEADERS})
        if drop == 0:
            await emit(b"")
        await watch.pause(self.options.first_token_delay)
        if chat:
            for i in range(len(plans)):
                await emit(framer.role(i))
        steps = max(len(p.pieces) for p in plans)
        for t in range(steps):
            if t:
                if delay > 0:
                    await watch.pause(delay)
                elif t % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                    if watch.gone:
                        raise _ClientGone
            for i, plan in enumerate(plans):
                last = len(plan.pieces) - 1
                if t < last:
                    await emit(framer.token(i, plan.pieces[t]))
                elif t == last:
                    await emit(framer.last(i, plan.pieces[t], plan.finish_reason, plan.stop_reason))
                else:
                    continue
                sent[0] += 1
        if g.include_usage:
            await emit(framer.usage(prompt_tokens, sum(len(p.pieces) for p in plans)))
        await emit(wire.DONE)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- control API (/_sim/*) -----------------------------------------------------

    async def _get_faults(self, req: Request) -> None:
        await send_json(req.send, 200, orjson.dumps({"faults": self.faults.snapshot()}))

    async def _set_faults(self, req: Request) -> None:
        try:
            spec = orjson.loads(req.body or b"{}")
            if not isinstance(spec, dict):
                raise FaultError("body must be a JSON object")
            self.faults.configure(spec)
        except (orjson.JSONDecodeError, FaultError) as exc:
            await send_json(req.send, 400, orjson.dumps({"error": str(exc)}))
            return
        await send_json(req.send, 200, orjson.dumps({"faults": self.faults.snapshot()}))

    async def _reset(self, req: Request) -> None:
        self.faults.reset()
        self.stats.reset()
        await send_json(req.send, 200, orjson.dumps({"ok": True}))

    async def _stats(self, req: Request) -> None:
        await send_json(req.send, 200, orjson.dumps(self.stats.snapshot()))

    async def _wait_aborted(self, req: Request) -> None:
        await self._wait_on(req, "aborted")

    async def _wait(self, req: Request) -> None:
        field = parse_qs(req.query.decode("latin-1")).get("field", ["completed"])[0]
        if field not in _WAITABLE:
            await send_json(
                req.send, 400, orjson.dumps({"error": f"field must be one of {_WAITABLE}"})
            )
            return
        await self._wait_on(req, field)

    async def _wait_on(self, req: Request, field: str) -> None:
        query = parse_qs(req.query.decode("latin-1"))
        try:
            n = int(query.get("n", ["1"])[0])
            timeout = min(float(query.get("timeout", ["5"])[0]), 60.0)
        except ValueError:
            await send_json(req.send, 400, orjson.dumps({"error": "n and timeout must be numbers"}))
            return
        ok = await self.stats.wait_for(field, n, timeout)
        await send_json(req.send, 200 if ok else 408, orjson.dumps(self.stats.snapshot()))


def create_sim_app(options: SimOptions | None = None) -> SimApp:
    """An ASGI app simulating vLLM 0.32's OpenAI-compatible server."""
    return SimApp(options or SimOptions())
