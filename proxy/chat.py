"""``POST /chat``: the simplified chat endpoint, translated to ``/chat/completions``.

Request ``{"messages", "max_tokens"?, "temperature"?, "top_p"?, "stop"?,
"model"?, "stream"?}``; defaults from ``VLLM_MODEL``,
``VLLM_DEFAULT_MAX_TOKENS`` and ``VLLM_DEFAULT_TEMPERATURE``. Other fields
are passed to vLLM unchanged (``seed``, ``top_k``, ``presence_penalty``...),
except ``n`` (only 1) and ``stream_options`` (the gateway's own).

Answer ``{"content", "model", "usage", "finish_reason"}``, or with
``"stream": true`` an event stream::

    data: <text of one delta; one data: line per line of text>

    event: usage
    data:{"prompt_tokens":9,"completion_tokens":40,"total_tokens":49,"finish_reason":"stop",...}

    data: [DONE]

and, when the upstream fails after the stream began, ``event: error`` with
an OpenAI-style error body as data, then the end (no ``[DONE]``).

It shares the ``/v1`` relay's body reading, retry policy and disconnect
handling (:class:`proxy.passthrough.Relay`); unlike ``/v1`` it parses the
upstream's answer, which is the point of the translation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Receive, Scope, Send
from proxy.chatrequest import InvalidChat, parse_chat
from proxy.config import Settings
from proxy.errors import (
    ClientError,
    GatewayError,
    MethodNotAllowed,
    UpstreamAuthRefused,
    UpstreamError,
    UpstreamProtocolError,
    error_body,
    send_json,
    upstream_error,
)
from proxy.headers import upstream_request_headers
from proxy.passthrough import Relay
from proxy.sse import DONE, SSEDecoder, encode_data
from proxy.upstream import UpstreamResponse

log = logging.getLogger(__name__)

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# The most of an upstream error body /chat reads (it shows at most 1000 characters).
ERROR_BODY_BYTES = 1024 * 1024


def _count(raw: dict[str, Any], name: str) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise UpstreamProtocolError(f"upstream sent a usage.{name} that is not a number")
    return int(value)


def _usage(raw: Any) -> dict[str, int]:
    """Token counts from an upstream ``usage``; raises UpstreamProtocolError if unreadable."""
    if raw is not None and not isinstance(raw, dict):
        raise UpstreamProtocolError("upstream sent a usage that is not an object")
    raw = raw or {}
    prompt = _count(raw, "prompt_tokens") or 0
    completion = _count(raw, "completion_tokens") or 0
    total = _count(raw, "total_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total if total is not None else prompt + completion,
    }


def _text(value: Any, what: str) -> str | None:
    """``value`` if it is a string or null; else UpstreamProtocolError naming ``what``."""
    if value is None or isinstance(value, str):
        return value
    raise UpstreamProtocolError(f"upstream sent a {what} that is not a string")


def translate_completion(body: bytes, fallback_model: str) -> dict[str, Any]:
    """A ``chat.completion`` body → the ``/chat`` answer. Raises UpstreamProtocolError."""
    try:
        data = orjson.loads(body)
        choice = data["choices"][0]
        content = choice["message"].get("content")
        model = data.get("model")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamProtocolError(
            f"upstream sent an unexpected chat completion ({type(exc).__name__})"
        ) from None
    return {
        "content": _text(content, "message content") or "",
        "model": _text(model, "model") or fallback_model,
        "usage": _usage(data.get("usage")),
        "finish_reason": _text(choice.get("finish_reason"), "finish_reason"),
    }


async def relay_error(send: Send, response: UpstreamResponse) -> None:
    """An upstream error answer (4xx/5xx) with its status, in the gateway's error shape
    (vLLM's message kept, a string ``code``). A 401/403 raises UpstreamAuthRefused."""
    body = await response.read(limit=ERROR_BODY_BYTES)
    status = response.status
    if status in (401, 403):
        raise UpstreamAuthRefused.for_status(status)
    message, kind, param, code = upstream_error(status, body)
    if status == 404 and message == "Not Found":
        message = (
            "the upstream has no /chat/completions (it answered 404 Not Found): does "
            "VLLM_BASE_URL end in /v1?"
        )
    await send_json(send, status, error_body(message, kind, code, param))


class _StreamState:
    __slots__ = ("done", "finish_reason", "model", "usage")

    def __init__(self, model: str) -> None:
        self.model = model
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.done = False

    def on_chunk(self, data: str) -> str | None:
        """One upstream ``data:`` payload → the delta text (or None). Raises UpstreamError."""
        if data == "[DONE]":
            self.done = True
            return None
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("upstream sent a stream event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("upstream sent a stream event that is not an object")
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            raise UpstreamError(str(error.get("message") or "upstream reported an error"))
        self.model = _text(chunk.get("model"), "model") or self.model
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise UpstreamProtocolError("upstream sent 'choices' that is not a list")
        text = None
        for choice in choices:
            if not isinstance(choice, dict):
                raise UpstreamProtocolError("upstream sent a choice that is not an object")
            if choice.get("index", 0) != 0:
                continue
            finish_reason = _text(choice.get("finish_reason"), "finish_reason")
            if finish_reason:
                self.finish_reason = finish_reason
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise UpstreamProtocolError("upstream sent a delta that is not an object")
            text = _text(delta.get("content"), "delta content")
        return text or None

    def summary(self) -> bytes:
        usage = self.usage or _usage(None)
        info = {**usage, "finish_reason": self.finish_reason, "model": self.model}
        return encode_data(orjson.dumps(info).decode(), "usage", hide_from_line_readers=True)


def error_event(exc: UpstreamError) -> bytes:
    return encode_data(exc.body().decode(), "error")


class Chat:
    """The ``POST /chat`` ASGI app."""

    def __init__(self, relay: Relay, settings: Settings) -> None:
        self.relay = relay
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await MethodNotAllowed("use POST /chat").send(send, [(b"allow", b"POST")])
            return
        info = request_info(scope)
        body = await self.relay.read_request(scope, receive, send, info)
        if body is None:
            return
        try:
            payload, stream = parse_chat(body, self.settings)
        except InvalidChat as exc:
            await exc.send(send)
            return
        relay = self.relay
        try:
            dispatch = relay.router.dispatch(
                payload["model"],
                relay.router.session_key(scope["headers"], payload.get("user")),
                info,
            )
        except ClientError as exc:  # no upstream serves the model
            await exc.send(send)
            return
        headers = upstream_request_headers(
            [(b"content-type", b"application/json")], api_key=b"", request_id=info.request_id
        )
        request = orjson.dumps(payload)
        ticket = None
        if info.key is not None and info.key.policy:
            try:
                ticket = await self.relay.admit(info, body, "/chat/completions", payload)
            except GatewayError as exc:
                await exc.send(send)
                return
            if ticket is not None:
                send = ticket.wrap(send)

        async def attempt() -> UpstreamResponse:
            info.attempts += 1
            return await dispatch.send("POST", "/chat/completions", b"", headers, request)

        try:
            await relay.guard(
                receive, info, lambda: self._exchange(send, attempt, info, payload["model"], stream)
            )
        finally:
            dispatch.release()
            if ticket is not None:
                ticket.finish(info)

    async def _exchange(
        self,
        send: Send,
        attempt: Callable[[], Awaitable[UpstreamResponse]],
        info: RequestInfo,
        model: str,
        stream: bool,
    ) -> bool:
        """Open the upstream, then answer as a stream or whole; True when fully answered."""
        response = await self._open(send, attempt, info)
        if response is None:
            return True
        answer = self._stream if stream else self._unary
        await answer(send, response, info, model)
        return True

    async def _open(
        self, send: Send, attempt: Callable[[], Awaitable[UpstreamResponse]], info: RequestInfo
    ) -> UpstreamResponse | None:
        """The upstream's 200 response, or None after sending the client its error."""
        try:
            response = await self.relay.open(attempt, info)
        except UpstreamError as exc:
            await exc.send(send)
            return None
        if response.status == 200:
            return response
        info.note = f"upstream-{response.status}"
        try:
            await relay_error(send, response)
        except UpstreamError as exc:
            await exc.send(send)
        finally:
            await response.aclose()
        return None

    async def _unary(
        self, send: Send, response: UpstreamResponse, info: RequestInfo, model: str
    ) -> None:
        try:
            answer = translate_completion(await response.read(), model)
            info.usage = (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"])
        except UpstreamError as exc:
            log.warning("upstream failed: %s (id=%s)", exc.message, info.id_text)
            info.note = exc.code or ""
            await exc.send(send)
            return
        finally:
            await response.aclose()
        await send_json(send, 200, orjson.dumps(answer))

    async def _stream(
        self, send: Send, response: UpstreamResponse, info: RequestInfo, model: str
    ) -> None:
        state = _StreamState(model)
        decoder = SSEDecoder()
        try:
            await send(
                {"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)}
            )
            async for chunk in response.chunks():
                for event in decoder.feed(chunk):
                    info.generated += 1
                    text = state.on_chunk(event.data)
                    if text is not None:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": encode_data(text),
                                "more_body": True,
                            }
                        )
                if state.done:
                    break
            if not state.done:
                raise UpstreamError(
                    "upstream ended the stream before [DONE]", code="upstream_stream_incomplete"
                )
            tail = state.summary() + DONE
        except UpstreamError as exc:
            # The status is out: say what happened in-band, then end the stream cleanly.
            info.note = f"stream-error:{exc.code}"
            log.warning("upstream failed mid-stream: %s (id=%s)", exc.message, info.id_text)
            tail = error_event(exc)
        finally:
            await response.aclose()
            if state.usage is not None:
                info.usage = (state.usage["prompt_tokens"], state.usage["completion_tokens"])
        await send({"type": "http.response.body", "body": tail, "more_body": False})
