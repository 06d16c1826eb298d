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

One turn is run by :class:`ChatCore`, which yields transport-neutral events
(:class:`Delta`, :class:`Done`, :class:`Failed`); :class:`Chat` writes them as
HTTP (JSON or SSE) and :mod:`proxy.ws` as WebSocket messages.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Message, Receive, Scope, Send
from proxy.chatrequest import InvalidChat, chat_payload, parse_chat
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
from proxy.headers import HeaderList, upstream_request_headers
from proxy.history import Conversation, History, wants_history
from proxy.limits import Ticket
from proxy.passthrough import Relay
from proxy.routing.router import Dispatch
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


# ---- the transport-agnostic core --------------------------------------------------------


class Turn:
    """One validated chat request: the upstream payload, whether to stream, the model."""

    __slots__ = ("model", "payload", "session", "stream")

    def __init__(self, payload: dict[str, Any], stream: bool, session: str | None = None) -> None:
        self.payload = payload
        self.stream = stream
        self.model: str = payload["model"]
        self.session = session  # the session-affinity key (header or ``user``), if any


class Started:
    """The upstream accepted a streamed request (status 200); deltas follow."""

    __slots__ = ()


STARTED = Started()


class Delta:
    """A piece of the answer's text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class Done:
    """The answer is complete: its whole text, usage, finish reason and model."""

    __slots__ = ("content", "conversation_id", "finish_reason", "model", "usage")

    def __init__(
        self, content: str, usage: dict[str, int], finish_reason: str | None, model: str
    ) -> None:
        self.content = content
        self.usage = usage
        self.finish_reason = finish_reason
        self.model = model
        self.conversation_id: str | None = None  # set when the turn is stored

    def answer(self) -> dict[str, Any]:
        """The whole ``/chat`` answer."""
        out = {
            "content": self.content,
            "model": self.model,
            "usage": self.usage,
            "finish_reason": self.finish_reason,
        }
        return self._with_conversation(out)

    def summary(self) -> dict[str, Any]:
        """Usage, finish reason and model: what ends a stream."""
        out = {**self.usage, "finish_reason": self.finish_reason, "model": self.model}
        return self._with_conversation(out)

    def _with_conversation(self, out: dict[str, Any]) -> dict[str, Any]:
        if self.conversation_id is not None:
            out["conversation_id"] = self.conversation_id
        return out


class Failed:
    """The request failed: an OpenAI-style error body with its HTTP status (and headers).

    Before :data:`STARTED` the status is the answer's; after it, the error is in-band.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    @classmethod
    def of(cls, exc: GatewayError) -> Failed:
        return cls(exc.status, exc.body(), exc.headers)


class Admitted:
    """The caller's key was admitted under its limits: the HTTP transport adds the
    ticket's rate-limit headers to its response (a WebSocket has none to add)."""

    __slots__ = ("ticket",)

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket


class InConversation:
    """The turn belongs to a stored conversation: the HTTP transport sends its id in the
    ``x-conversation-id`` header (a WebSocket gets it in its ``done`` event)."""

    __slots__ = ("conversation",)

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation


ChatEvent = Admitted | InConversation | Started | Delta | Done | Failed


class ChatCore:
    """The one implementation of a chat turn behind ``POST /chat`` and ``/chat/ws``.

    :meth:`parse` validates a request body; :meth:`run` opens the upstream through the
    relay (same retry policy as ``/v1``) and yields :data:`ChatEvent` s until one
    :class:`Done` or :class:`Failed`. A transport only writes the events out, so
    whatever a turn needs besides the upstream (admission and charging by key and
    limits, loading and storing a conversation, metrics) belongs here, once, and both
    transports get it. Cancelling the consumer (client gone, ``cancel`` message) closes
    the upstream response at once, which makes vLLM abort the generation.
    """

    def __init__(self, relay: Relay, settings: Settings, history: History | None = None) -> None:
        self.relay = relay
        self.settings = settings
        self.history = history

    def parse(self, body: bytes, headers: HeaderList = ()) -> Turn:
        """Validate a ``/chat`` body. Raises :class:`InvalidChat` (400) naming the field.
        ``headers`` (the request's) may carry the session-affinity header."""
        return self._turn(*parse_chat(body, self.settings), headers)

    def turn(self, fields: dict[str, Any], headers: HeaderList = ()) -> Turn:
        """:meth:`parse` on decoded fields (a ``/chat/ws`` message). Raises InvalidChat."""
        return self._turn(*chat_payload(fields, self.settings), headers)

    def _turn(self, payload: dict[str, Any], stream: bool, headers: HeaderList) -> Turn:
        user = payload.get("user")
        session = self.relay.router.session_key(headers, user if isinstance(user, str) else None)
        return Turn(payload, stream, session)

    async def run(self, turn: Turn, info: RequestInfo) -> AsyncIterator[ChatEvent]:
        """The events of one turn; always ends with a :class:`Done` or a :class:`Failed`.

        With ``conversation_id`` or ``store`` the conversation is locked and loaded first
        (:mod:`proxy.history`), stored when the answer is :class:`Done` and unlocked
        before that last event goes out.
        """
        if self.history is None or not wants_history(turn.payload):
            async for event in self._run(turn, info):
                yield event
            return
        try:
            convo = await self.history.begin(turn.payload, info.key, info.request_id)
        except GatewayError as exc:
            yield Failed.of(exc)
            return
        try:
            if convo is not None:
                yield InConversation(convo)
            async with aclosing(self._run(turn, info)) as events:
                async for event in events:
                    if convo is not None and isinstance(event, Done):
                        event.conversation_id = await convo.commit(event.content)
                    elif convo is not None and isinstance(event, Failed):
                        await convo.release()
                    yield event
        finally:
            if convo is not None:
                await convo.release()

    async def _run(self, turn: Turn, info: RequestInfo) -> AsyncIterator[ChatEvent]:
        """:meth:`run` without history.

        The caller's key is admitted first (its models and limits; an :class:`Admitted`
        event carries the ticket), then the model routed to an upstream; the ticket is
        corrected to the real usage when the turn ends, however it ends.
        """
        relay = self.relay
        info.model = turn.model
        request = orjson.dumps(turn.payload)
        ticket = None
        if info.key is not None and info.key.policy:
            try:
                ticket = await relay.admit(info, request, "/chat/completions", turn.payload)
            except GatewayError as exc:
                yield Failed.of(exc)
                return
        dispatch = None
        try:
            if ticket is not None:
                yield Admitted(ticket)
            try:
                dispatch = relay.router.dispatch(turn.model, turn.session, info)
            except ClientError as exc:  # no upstream serves the model
                yield Failed.of(exc)
                return
            async for event in self._exchange(turn, info, dispatch, request):
                yield event
        finally:
            if dispatch is not None:
                dispatch.release()
            if ticket is not None:
                ticket.finish(info)

    async def _exchange(
        self, turn: Turn, info: RequestInfo, dispatch: Dispatch, request: bytes
    ) -> AsyncIterator[ChatEvent]:
        headers = upstream_request_headers(
            [(b"content-type", b"application/json")], api_key=b"", request_id=info.request_id
        )

        async def attempt() -> UpstreamResponse:
            info.attempts += 1
            return await dispatch.send("POST", "/chat/completions", b"", headers, request)

        try:
            response = await self.relay.open(attempt, info)
        except UpstreamError as exc:
            yield Failed.of(exc)
            return
        try:
            if response.status != 200:
                info.note = f"upstream-{response.status}"
                yield await _error_answer(response)
            elif turn.stream:
                yield STARTED
                async for event in _stream_events(response, turn.model, info):
                    yield event
            else:
                yield await _whole_answer(response, turn.model, info)
        finally:
            await response.aclose()


async def _error_answer(response: UpstreamResponse) -> Failed:
    """The upstream's error answer (4xx/5xx), as :func:`relay_error` renders it."""
    sent: list[Message] = []

    async def keep(message: Message) -> None:
        sent.append(message)

    try:
        await relay_error(keep, response)
    except UpstreamError as exc:
        return Failed.of(exc)
    start, body = sent
    return Failed(start["status"], body["body"], [])


async def _whole_answer(response: UpstreamResponse, model: str, info: RequestInfo) -> ChatEvent:
    try:
        answer = translate_completion(await response.read(), model)
    except UpstreamError as exc:
        log.warning("upstream failed: %s (id=%s)", exc.message, info.id_text)
        info.note = exc.code or ""
        return Failed.of(exc)
    usage = answer["usage"]
    info.usage = (usage["prompt_tokens"], usage["completion_tokens"])
    return Done(answer["content"], usage, answer["finish_reason"], answer["model"])


async def _stream_events(
    response: UpstreamResponse, model: str, info: RequestInfo
) -> AsyncIterator[ChatEvent]:
    state = _StreamState(model)
    decoder = SSEDecoder()
    parts: list[str] = []
    try:
        async for chunk in response.chunks():
            for event in decoder.feed(chunk):
                info.generated += 1
                text = state.on_chunk(event.data)
                if text is not None:
                    parts.append(text)
                    yield Delta(text)
            if state.done:
                break
        if not state.done:
            raise UpstreamError(
                "upstream ended the stream before [DONE]", code="upstream_stream_incomplete"
            )
    except UpstreamError as exc:
        info.note = f"stream-error:{exc.code}"
        info.outcome = "upstream_cut"
        log.warning("upstream failed mid-stream: %s (id=%s)", exc.message, info.id_text)
        yield Failed.of(exc)
        return
    finally:
        if state.usage is not None:
            info.usage = (state.usage["prompt_tokens"], state.usage["completion_tokens"])
    yield Done("".join(parts), state.usage or _usage(None), state.finish_reason, state.model)


# ---- POST /chat: the HTTP transport ------------------------------------------------------


class Chat:
    """The ``POST /chat`` ASGI app: a whole JSON answer or an SSE stream of the core's events."""

    def __init__(self, core: ChatCore) -> None:
        self.core = core
        self.relay = core.relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await MethodNotAllowed("use POST /chat").send(send, [(b"allow", b"POST")])
            return
        info = request_info(scope)
        body = await self.relay.read_request(scope, receive, send, info)
        if body is None:
            return
        try:
            turn = self.core.parse(body, scope["headers"])
        except InvalidChat as exc:
            await exc.send(send)
            return
        await self.relay.guard(scope, receive, info, lambda: self._exchange(send, turn, info))

    async def _exchange(self, send: Send, turn: Turn, info: RequestInfo) -> bool:
        """Write the turn's events as HTTP; True when the answer was sent completely."""
        started = False
        async with aclosing(self.core.run(turn, info)) as events:
            async for event in events:
                if isinstance(event, Admitted):
                    send = event.ticket.wrap(send)  # x-ratelimit-* on the response
                elif isinstance(event, InConversation):
                    send = event.conversation.wrap(send)  # x-conversation-id
                elif isinstance(event, Delta):
                    await send(
                        {
                            "type": "http.response.body",
                            "body": encode_data(event.text),
                            "more_body": True,
                        }
                    )
                elif event is STARTED:
                    started = True
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": list(_SSE_HEADERS),
                        }
                    )
                elif isinstance(event, Done):
                    if turn.stream:
                        await _end_stream(send, _usage_event(event) + DONE)
                    else:
                        await send_json(send, 200, orjson.dumps(event.answer()))
                elif isinstance(event, Failed):
                    if started:
                        # The status is out: say what happened in-band, then end cleanly.
                        await _end_stream(send, encode_data(event.body.decode(), "error"))
                    else:
                        await send_json(send, event.status, event.body, event.headers)
        return True


def _usage_event(done: Done) -> bytes:
    return encode_data(orjson.dumps(done.summary()).decode(), "usage", hide_from_line_readers=True)


async def _end_stream(send: Send, tail: bytes) -> None:
    await send({"type": "http.response.body", "body": tail, "more_body": False})
