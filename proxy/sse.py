"""Server-sent events on bytes: an incremental decoder and the encoder for ``/chat``.

The decoder follows the WHATWG event-stream rules: lines end in ``\\r\\n``,
``\\n`` or ``\\r``; ``data`` lines of one event are joined with ``\\n``; a
blank line dispatches the event; an event with no data is not dispatched;
``:`` lines are comments. It works on raw network chunks: a line is decoded
only once it is complete, so a UTF-8 character split across chunks is never
lost, and only complete events come out.

SSE cannot carry a carriage return inside data (every CR is a line end), so
:func:`encode_data` sends ``\\r\\n`` and ``\\r`` as line breaks and a parser
gets them back as ``\\n`` — :func:`normalize_newlines` says what to expect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import UpstreamProtocolError

DONE = b"data: [DONE]\n\n"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_END = re.compile(rb"[\r\n]")

# The largest event (or unfinished line) a decoder holds by default: vLLM's largest
# events (a chunk with top logprobs) are a few KiB.
MAX_EVENT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class EventTooLarge(UpstreamProtocolError):
    """An event (or one line) grew past the decoder's ``max_event_bytes``."""


class SSEDecoder:
    """Feed raw bytes, get complete :class:`Event` s back.

    Linear in the bytes fed: each byte is scanned for a line end once, however the
    stream is cut. An event, or a line not yet ended, larger than ``max_event_bytes``
    raises :class:`EventTooLarge`, so memory stays bounded by that.
    """

    __slots__ = ("_buffer", "_data", "_event", "_id", "_max", "_scan", "_size", "_started")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._scan = 0  # bytes of the buffer before this hold no line end
        self._data: list[str] = []
        self._size = 0  # bytes of the data lines of the event being built
        self._max = max_event_bytes
        self._event = ""
        self._id: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer
        buffer += chunk
        if not self._started:
            if not buffer or (len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer)):
                return []  # maybe the start of a BOM: wait for more
            self._started = True
            if buffer.startswith(b"\xef\xbb\xbf"):
                del buffer[:3]
        events: list[Event] = []
        start = 0
        size = len(buffer)
        scan = self._scan
        while True:
            found = _LINE_END.search(buffer, scan)
            if found is None:
                scan = size
                break
            end = found.start()
            if buffer[end] == 13:  # CR
                if end + 1 == size:
                    scan = end  # a CR at the end may be half of a CRLF: wait for the next byte
                    break
                after = end + (2 if buffer[end + 1] == 10 else 1)
            else:
                after = end + 1
            event = self._line(buffer[start:end].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = scan = after
        if start:
            del buffer[:start]
        self._scan = scan - start
        if len(buffer) + self._size > self._max:
            raise EventTooLarge(f"upstream sent an event larger than {self._max} bytes")
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._max:
                raise EventTooLarge(f"upstream sent an event larger than {self._max} bytes")
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event, self._size = [], "", 0
        if not data:
            return None
        return Event("\n".join(data), event or "message", self._id)


def normalize_newlines(text: str) -> str:
    """``text`` as it reads after an SSE round trip (``\\r\\n`` and ``\\r`` become ``\\n``)."""
    return _LINE_BREAK.sub("\n", text)


def encode_data(
    text: str, event: str | None = None, *, hide_from_line_readers: bool = False
) -> bytes:
    """One event carrying ``text``: one ``data:`` line per line of text.

    ``hide_from_line_readers`` writes ``data:`` with no space after the colon
    (the same thing to an SSE parser), so simple clients that look for lines
    starting ``data: `` skip the event (JSON never starts with a space).
    """
    lines = [f"event: {event}"] if event else []
    for line in _LINE_BREAK.split(text):
        # Without the space a leading space of the text would be eaten by the parser.
        hidden = hide_from_line_readers and not line.startswith(" ")
        lines.append(("data:" if hidden else "data: ") + line)
    return ("\n".join(lines) + "\n\n").encode()
