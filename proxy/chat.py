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
    GatewayError,
    MethodNotAllowed,
    UpstreamError,
    UpstreamProtocolError,
    send_json,
)
from proxy.headers import upstream_request_headers
from proxy.history import Conversation, History
from proxy.passthrough import Relay
from proxy.sse import DONE, SSEDecoder, encode_data
from proxy.upstream import UpstreamResponse

log = logging.getLogger(__name__)

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _usage(raw: Any) -> dict[str, int]:
    raw = raw if isinstance(raw, dict) else {}
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    total = raw.get("total_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(total) if total is not None else prompt + completion,
    }


def translate_completion(body: bytes, fallback_model: str) -> dict[str, Any]:
    """A ``chat.completion`` body → the ``/chat`` answer. Raises UpstreamProtocolError."""
    try:
        data = orjson.loads(body)
        choice = data["choices"][0]
        content = choice["message"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamProtocolError(
            f"upstream sent an unexpected chat completion ({exc!r})"
        ) from None
    return {
        "content": content or "",
        "model": data.get("model") or fallback_model,
        "usage": _usage(data.get("usage")),
        "finish_reason": choice.get("finish_reason"),
    }


async def relay_error(send: Send, response: UpstreamResponse) -> None:
    """An upstream error answer (4xx/5xx) with its status; its body if JSON, else wrapped."""
    body = await response.read()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not (isinstance(parsed, dict) and "error" in parsed):
        text = (
            body.decode("utf-8", "replace").strip()[:1000] or f"upstream answered {response.status}"
        )
        kind = "invalid_request_error" if response.status < 500 else "upstream_error"
        body = orjson.dumps(
            {"error": {"message": text, "type": kind, "param": None, "code": response.status}}
        )
    await send_json(send, response.status, body)


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
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        text = None
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            text = (choice.get("delta") or {}).get("content")
        return text or None

    def summary(self, extra: dict[str, Any]) -> bytes:
        usage = self.usage or _usage(None)
        info = {**usage, "finish_reason": self.finish_reason, "model": self.model, **extra}
        return encode_data(orjson.dumps(info).decode(), "usage", hide_from_line_readers=True)


def error_event(exc: UpstreamError) -> bytes:
    return encode_data(exc.body().decode(), "error")


class Chat:
    """The ``POST /chat`` ASGI app."""

    def __init__(self, relay: Relay, settings: Settings, history: History | None = None) -> None:
        self.relay = relay
        self.settings = settings
        self.history = history

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
        convo = None
        if self.history is not None and ("conversation_id" in payload or "store" in payload):
            try:
                convo = await self.history.begin(payload, info.key, info.request_id)
            except GatewayError as exc:
                await exc.send(send)
                return
            if convo is not None:
                send = convo.wrap(send)
        upstream = self.relay.upstream
        url = upstream.url("/chat/completions")
        headers = upstream_request_headers(
            [(b"content-type", b"application/json")],
            api_key=self.relay.api_key,
            request_id=info.request_id,
        )
        request = orjson.dumps(payload)
        ticket = None

        async def attempt() -> UpstreamResponse:
            info.attempts += 1
            return await upstream.send("POST", url, headers, request)

        try:
            if info.key is not None and info.key.policy:
                try:
                    ticket = await self.relay.admit(info, request, "/chat/completions", payload)
                except GatewayError as exc:
                    await exc.send(send)
                    return
                if ticket is not None:
                    send = ticket.wrap(send)
            await self.relay.guard(
                receive,
                info,
                lambda: self._exchange(send, attempt, info, payload["model"], stream, convo),
            )
        finally:
            if ticket is not None:
                ticket.finish(info)
            if convo is not None:
                await convo.release()

    async def _exchange(
        self,
        send: Send,
        attempt: Callable[[], Awaitable[UpstreamResponse]],
        info: RequestInfo,
        model: str,
        stream: bool,
        convo: Conversation | None = None,
    ) -> bool:
        """Open the upstream, then answer as a stream or whole; True when fully answered."""
        response = await self._open(send, attempt, info)
        if response is None:
            return True
        answer = self._stream if stream else self._unary
        await answer(send, response, info, model, convo)
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
        self,
        send: Send,
        response: UpstreamResponse,
        info: RequestInfo,
        model: str,
        convo: Conversation | None,
    ) -> None:
        try:
            answer = translate_completion(await response.read(), model)
            info.usage = (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"])
        except UpstreamError as exc:
            log.warning("upstream failed: %s (id=%s)", exc.message, info.request_id)
            info.note = exc.code or ""
            await exc.send(send)
            return
        finally:
            await response.aclose()
        if convo is not None:
            answer["conversation_id"] = await convo.commit(answer["content"])
        await send_json(send, 200, orjson.dumps(answer))

    async def _stream(
        self,
        send: Send,
        response: UpstreamResponse,
        info: RequestInfo,
        model: str,
        convo: Conversation | None,
    ) -> None:
        state = _StreamState(model)
        parts: list[str] = []
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
                        parts.append(text)
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
            extra = {}
            if convo is not None:
                extra["conversation_id"] = await convo.commit("".join(parts))
            tail = state.summary(extra) + DONE
        except UpstreamError as exc:
            # The status is out: say what happened in-band, then end the stream cleanly.
            info.note = f"stream-error:{exc.code}"
            log.warning("upstream failed mid-stream: %s (id=%s)", exc.message, info.request_id)
            tail = error_event(exc)
        finally:
            await response.aclose()
            if state.usage is not None:
                info.usage = (state.usage["prompt_tokens"], state.usage["completion_tokens"])
        await send({"type": "http.response.body", "body": tail, "more_body": False})
