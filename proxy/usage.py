"""Token usage of an answer, read without changing its bytes; ``include_usage`` add/strip.

* :func:`usage_in` finds the last ``"usage":{...}`` in a piece of JSON or SSE (the
  tail of a body or stream) and reads ``prompt_tokens`` / ``completion_tokens``.
* :func:`ask_for_usage` adds ``"stream_options":{"include_usage":true}`` to a
  streaming request that did not ask for it.
* :class:`UsageStripper` then removes exactly that usage chunk from the stream, so
  the client gets the bytes vLLM would have sent for its own request. vLLM, asked
  for usage, moves ``system_fingerprint`` from the finish chunk to the usage chunk
  (reference/vllm-wire 04 vs 05, 07 vs 07b): the stripper holds each finish chunk
  until the usage chunk arrives and puts the fingerprint back where it was.
* :class:`Meter` watches a relayed body: the tail for usage (or the stripper), and
  the number of events of a stream, for an answer cut short.

Metrics (tokens per key and model) read the same figures from ``RequestInfo.usage``.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.accesslog import RequestInfo

_USAGE = b'"usage":{'
_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')
_TAIL = 4096  # bytes of a body kept to find its usage (vLLM puts it at the end)
_FINGERPRINT = b',"system_fingerprint":'
_EVENT_END = b"\n\n"


def usage_in(data: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the last usage object in ``data``."""
    at = data.rfind(_USAGE)
    if at < 0:
        return None
    window = data[at : at + 400]
    prompt = _PROMPT.search(window)
    if prompt is None:
        return None
    completion = _COMPLETION.search(window)
    return int(prompt.group(1)), int(completion.group(1)) if completion else 0


def wants_usage(parsed: dict[str, Any]) -> bool:
    options = parsed.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def ask_for_usage(body: bytes, parsed: dict[str, Any]) -> bytes:
    """The request body with ``stream_options.include_usage`` set.

    Without ``stream_options`` the client's bytes are kept and the field appended
    before the final ``}``; otherwise the object is re-encoded with it added.
    """
    if "stream_options" not in parsed:
        end = body.rstrip().rfind(b"}")
        head = body[:end].rstrip()
        sep = b"" if head.endswith(b"{") else b","
        return head + sep + b'"stream_options":{"include_usage":true}' + body[end:]
    options = parsed["stream_options"] if isinstance(parsed["stream_options"], dict) else {}
    return orjson.dumps({**parsed, "stream_options": {**options, "include_usage": True}})


class UsageStripper:
    """Removes the usage chunk a client did not ask for; keeps every other byte.

    Works on whole SSE events (``\\n\\n``-terminated): bytes of an unfinished event
    wait for the rest. From the first finish chunk (``"finish_reason":"..."``) on,
    events are held until the usage chunk comes (then released, fingerprint
    restored, usage chunk dropped) or ``[DONE]`` or the end.
    """

    __slots__ = ("_held", "_partial", "events", "usage")

    def __init__(self) -> None:
        self._partial = b""
        self._held: list[bytes] = []
        self.usage: tuple[int, int] | None = None
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        if (
            not self._partial
            and not self._held
            and chunk.endswith(_EVENT_END)
            and b'"finish_reason":"' not in chunk
            and b'"usage":{' not in chunk
        ):
            # Whole events, none of them a finish or usage chunk (nearly every token):
            # nothing to hold or drop.
            self.events += chunk.count(_EVENT_END)
            return chunk
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(_EVENT_END)
        if end < 0:
            self._partial = data
            return b""
        self._partial = data[end + 2 :]
        out: list[bytes] = []
        for event in data[: end + 2].split(_EVENT_END)[:-1]:
            event += _EVENT_END
            self.events += 1
            if b'"choices":[],"usage":{' in event:
                self.usage = usage_in(event)
                at = event.rfind(_FINGERPRINT)
                fingerprint = event[at:-3] if at >= 0 and event.endswith(b"}\n\n") else b""
                out += [_with_fingerprint(e, fingerprint) for e in self._held]
                self._held.clear()
            elif self._held or b'"finish_reason":"' in event:
                if event.startswith(b"data: [DONE]"):
                    out += self._held
                    self._held.clear()
                    out.append(event)
                else:
                    self._held.append(event)
            else:
                out.append(event)
        return b"".join(out)

    def close(self) -> bytes:
        """What is still held when the stream ends (unchanged)."""
        rest = b"".join(self._held) + self._partial
        self._held.clear()
        self._partial = b""
        return rest


def _with_fingerprint(event: bytes, fingerprint: bytes) -> bytes:
    if (
        not fingerprint
        or b'"finish_reason":"' not in event
        or b'"system_fingerprint"' in event
        or not event.endswith(b"}\n\n")
    ):
        return event
    return event[:-3] + fingerprint + b"}\n\n"


class Meter:
    """Reads a relayed answer's usage into ``info`` as its bytes pass (and strips the
    usage chunk when the gateway asked for it)."""

    __slots__ = ("_info", "_stream", "_stripper", "_tail")

    def __init__(self, info: RequestInfo, *, stream: bool, strip: bool) -> None:
        self._info = info
        self._stream = stream
        self._stripper = UsageStripper() if strip else None
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` goes to the client now (all of it, unless stripping)."""
        stripper = self._stripper
        if stripper is not None:
            return stripper.feed(chunk)
        if self._stream:
            self._info.generated += chunk.count(b"data: ")
        tail = self._tail
        self._tail = (tail + chunk)[-_TAIL:] if tail else chunk[-_TAIL:]
        return chunk

    def close(self) -> bytes:
        """The bytes still held when the answer ended completely (send them last)."""
        return self._stripper.close() if self._stripper is not None else b""

    def end(self) -> None:
        """Record the usage found in ``info`` (once, however the answer ended)."""
        stripper = self._stripper
        if stripper is not None:
            self._info.usage = stripper.usage
            self._info.generated = stripper.events
        else:
            self._info.usage = usage_in(self._tail)
