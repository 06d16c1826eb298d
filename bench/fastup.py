"""A fast vLLM-compatible upstream for benchmarks: precomputed bytes on raw asyncio.

``python -m bench.fastup --port P [--tokens 128] [--delay-ms D] [--model M]``

The simulated vLLM (``python -m proxy.sim``) is a Starlette app that builds every
answer: 0.1-0.2 ms of CPU per response, which caps what a proxy in front of it can
show (nginx's figure above all). This responder does almost nothing per request so
the proxy, not the upstream, sets the pace: an :class:`asyncio.Protocol` on uvloop,
a request head parsed with a few ``bytes`` operations, answers built once per
(route, token count) and then written as they are.

It speaks HTTP/1.1 with keep-alive and ``Content-Length`` request bodies (a chunked
request body gets 400 and the connection is closed) and serves:

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: a complete answer in
  vLLM's shape with ``usage``, ``--tokens`` tokens (``x-sim-tokens`` overrides per
  request); with ``"stream": true`` in the body an SSE stream, one ``data:`` event
  per token in a chunk of its own, back to back or ``--delay-ms`` apart
  (``x-sim-delay-ms``, or ``x-sim-token-delay`` in seconds as for the simulator,
  override per request), the usage chunk only when the body asks
  ``"include_usage": true``, then ``data: [DONE]``. The first event leaves at once
  (no prefill time), so a client's time to first token is the path's own.
* ``GET /v1/models``, ``GET /health`` (200, empty), ``GET /metrics`` (a few
  ``vllm:`` gauges), ``GET /_fastup/stats`` (responses served, as JSON);
  anything else a 404 (405 for a known path with another method) with a JSON body.

The request body is never parsed: two substring checks decide ``stream`` and
``include_usage`` (they tolerate one space after the colon, as clients write it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

STREAM_MARKS = (b'"stream":true', b'"stream": true')
USAGE_MARKS = (b'"include_usage":true', b'"include_usage": true')
PROMPT_TOKENS = 16
FINGERPRINT = "vllm-fastup"
WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", "."]
CHAT, COMPLETIONS = b"/v1/chat/completions", b"/v1/completions"
MAX_TOKENS = 100_000


def _json(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    """A whole HTTP/1.1 response with ``Content-Length``."""
    head = b"HTTP/1.1 " + status.encode() + b"\r\nserver: fastup\r\ncontent-type: " + content_type
    return head + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nserver: fastup\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
STREAM_END = b"0\r\n\r\n"
NOT_FOUND = response("404 Not Found", b'{"detail":"Not Found"}')
NOT_ALLOWED = response("405 Method Not Allowed", b'{"detail":"Method Not Allowed"}')
BAD_REQUEST = response(
    "400 Bad Request",
    b'{"error":{"message":"fastup reads Content-Length bodies only","type":"BadRequestError",'
    b'"param":null,"code":400}}',
)
HEALTH = b"HTTP/1.1 200 OK\r\nserver: fastup\r\ncontent-length: 0\r\n\r\n"


class Answers:
    """Every answer's bytes, built once per (route, tokens[, usage]) and kept."""

    def __init__(self, model: str, models: list[str]) -> None:
        self.model = model
        self.created = int(time.time())
        self._plain: dict[tuple[bytes, int], bytes] = {}
        self._streams: dict[tuple[bytes, int, bool], list[bytes]] = {}
        listing = {
            "object": "list",
            "data": [
                {
                    "id": m,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "vllm",
                    "root": m,
                    "parent": None,
                    "max_model_len": MAX_TOKENS + 4096,
                }
                for m in models
            ],
        }
        self.models = response("200 OK", _json(listing).encode())

    def _usage(self, tokens: int) -> dict:
        return {
            "prompt_tokens": PROMPT_TOKENS,
            "total_tokens": PROMPT_TOKENS + tokens,
            "completion_tokens": tokens,
        }

    def plain(self, route: bytes, tokens: int) -> bytes:
        """The non-streaming answer."""
        found = self._plain.get((route, tokens))
        if found is not None:
            return found
        text = "".join(WORDS[i % len(WORDS)] for i in range(tokens))
        common = {"created": self.created, "model": self.model}
        if route == CHAT:
            body = {
                "id": "chatcmpl-fastup",
                "object": "chat.completion",
                **common,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
                "system_fingerprint": FINGERPRINT,
                "usage": self._usage(tokens),
            }
        else:
            body = {
                "id": "cmpl-fastup",
                "object": "text_completion",
                **common,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
                "system_fingerprint": FINGERPRINT,
                "usage": self._usage(tokens),
            }
        found = self._plain[(route, tokens)] = response("200 OK", _json(body).encode())
        return found

    def stream(self, route: bytes, tokens: int, usage: bool) -> list[bytes]:
        """The stream's chunks: the first carries the head, the last ``[DONE]`` and the end."""
        found = self._streams.get((route, tokens, usage))
        if found is not None:
            return found
        chat = route == CHAT
        base = {
            "id": "chatcmpl-fastup" if chat else "cmpl-fastup",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }
        events: list[dict] = []
        for i in range(tokens):
            word = WORDS[i % len(WORDS)]
            last = i == tokens - 1
            choice: dict = (
                {"index": 0, "delta": {"content": word}, "logprobs": None}
                if chat
                else {"index": 0, "text": word, "logprobs": None}
            )
            choice["finish_reason"] = "length" if last else None
            if last or not chat:
                choice["stop_reason"] = None
            event = {**base, "choices": [choice]}
            if last and not usage:
                event["system_fingerprint"] = FINGERPRINT
            events.append(event)
        if chat:  # vLLM's first chat event: the role, no content yet
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            events[0:0] = [{**base, "choices": [{**role, "finish_reason": None}]}]
        data = [b"data: " + _json(e).encode() + b"\n\n" for e in events]
        if usage:
            tail = {**base, "choices": [], "usage": self._usage(tokens)}
            tail["system_fingerprint"] = FINGERPRINT
            data.append(b"data: " + _json(tail).encode() + b"\n\n")
        data.append(b"data: [DONE]\n\n")
        chunks = [chunk(d) for d in data]
        if chat:  # the role event and the first token leave together
            chunks[0:2] = [chunks[0] + chunks[1]]
        # The last token, the usage chunk and [DONE] leave together, as vLLM sends them.
        tail_n = 3 if usage else 2
        chunks[-tail_n:] = [b"".join(chunks[-tail_n:]) + STREAM_END]
        chunks[0] = STREAM_HEAD + chunks[0]
        found = self._streams[(route, tokens, usage)] = chunks
        return found


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.running = 0


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lowercase, with the colon) in a lowercased head."""
    at = head.find(b"\r\n" + name)
    if at < 0:
        return None
    start = at + 2 + len(name)
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def _number(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class Connection(asyncio.Protocol):
    """One client connection: requests in order, one at a time (a pipelined request
    waits for the stream before it)."""

    def __init__(self, server: FastUp) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a paced stream is being written
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.server.stats.running -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self.busy:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._close(BAD_REQUEST)
                return
            head = buf[:end].lower()
            line_end = head.find(b"\r\n")
            request_line = head[:line_end] if line_end >= 0 else head
            parts = request_line.split(b" ")
            if len(parts) != 3:
                self._close(BAD_REQUEST)
                return
            method, target, version = parts
            if _header(head, b"transfer-encoding:") is not None:
                self._close(BAD_REQUEST)
                return
            length = _header(head, b"content-length:")
            size = int(length) if length and length.isdigit() else 0
            if len(buf) < end + 4 + size:
                return
            body = buf[end + 4 : end + 4 + size]
            self.buf = buf[end + 4 + size :]
            close = version != b"http/1.1" or _header(head, b"connection:") == b"close"
            self._answer(method, target.split(b"?", 1)[0], head, body, close)

    def _close(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.transport.close()
        self.buf = b""

    def _answer(self, method: bytes, path: bytes, head: bytes, body: bytes, close: bool) -> None:
        server = self.server
        transport = self.transport
        assert transport is not None
        if path in (CHAT, COMPLETIONS):
            if method != b"post":
                out = NOT_ALLOWED
            else:
                server.stats.requests += 1
                tokens = _number(_header(head, b"x-sim-tokens:"))
                n = max(1, min(MAX_TOKENS, int(tokens))) if tokens else server.tokens
                if any(m in body for m in STREAM_MARKS):
                    server.stats.streams += 1
                    self._stream(path, head, body, n, close)
                    return
                out = server.answers.plain(path, n)
        elif method != b"get":
            out = NOT_FOUND if path not in server.get_paths else NOT_ALLOWED
        elif path == b"/health":
            out = HEALTH
        elif path == b"/v1/models":
            out = server.answers.models
        elif path == b"/metrics":
            out = server.metrics()
        elif path == b"/_fastup/stats":
            stats = server.stats
            out = response(
                "200 OK", _json({"requests": stats.requests, "streams": stats.streams}).encode()
            )
        else:
            out = NOT_FOUND
        transport.write(out)
        if close:
            transport.close()

    def _stream(self, path: bytes, head: bytes, body: bytes, tokens: int, close: bool) -> None:
        server = self.server
        usage = any(m in body for m in USAGE_MARKS)
        chunks = server.answers.stream(path, tokens, usage)
        delay = _number(_header(head, b"x-sim-delay-ms:"))
        if delay is not None:
            delay /= 1000
        else:
            seconds = _number(_header(head, b"x-sim-token-delay:"))
            delay = seconds if seconds is not None else server.delay
        transport = self.transport
        assert transport is not None
        if delay <= 0:
            for c in chunks:  # back to back, but each token written (flushed) on its own
                transport.write(c)
            if close:
                transport.close()
            return
        transport.write(chunks[0])
        self.busy = True
        server.stats.running += 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        state = {"i": 1}

        def tick() -> None:
            i = state["i"]
            t = self.transport
            if t is None:
                return
            t.write(chunks[i])
            if i + 1 < len(chunks):
                state["i"] = i + 1
                self.timer = loop.call_at(start + (i + 1) * delay, tick)
                return
            self.timer = None
            self.busy = False
            server.stats.running -= 1
            if close:
                t.close()
            elif self.buf:
                self._serve()

        self.timer = loop.call_at(start + delay, tick)


class FastUp:
    """The listening server: settings, precomputed answers and counters."""

    def __init__(self, tokens: int, delay: float, models: list[str]) -> None:
        self.tokens = tokens
        self.delay = delay
        self.answers = Answers(models[0], models)
        self.models = models
        self.stats = Stats()
        self.get_paths = {b"/health", b"/v1/models", b"/metrics", b"/_fastup/stats"}

    def metrics(self) -> bytes:
        label = f'{{model_name="{self.models[0]}"}}'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {self.stats.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} 0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} 0.0",
        ]
        return response("200 OK", ("\n".join(lines) + "\n").encode(), b"text/plain; version=0.0.4")


async def serve(args: argparse.Namespace) -> None:
    models = [m for m in args.model.split(",") if m]
    server = FastUp(args.tokens, args.delay_ms / 1000, models)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: Connection(server), args.host, args.port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    srv.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fastup", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokens", type=int, default=128, help="tokens per answer (default 128)")
    p.add_argument(
        "--delay-ms", type=float, default=0.0, help="ms between a stream's tokens (default 0)"
    )
    p.add_argument("--model", default="tiny-llama", help="served models, comma-separated")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, slower
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
