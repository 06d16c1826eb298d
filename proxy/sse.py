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

DONE = b"data: [DONE]\n\n"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed raw bytes, get complete :class:`Event` s back."""

    __slots__ = ("_buffer", "_data", "_event", "_id", "_started")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk
        if not self._started and buffer:
            if len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer):
                self._buffer = buffer  # maybe the start of a BOM: wait for more
                return []
            self._started = True
            buffer = buffer.removeprefix(b"\xef\xbb\xbf")
        events: list[Event] = []
        start = 0
        size = len(buffer)
        while start < size:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr + 1 == size:
                    break  # a CR at the end may be half of a CRLF: wait for the next byte
                end, after = cr, cr + (2 if buffer[cr + 1 : cr + 2] == b"\n" else 1)
            else:
                end, after = lf, lf + 1
            event = self._line(buffer[start:end].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = after
        self._buffer = buffer[start:]
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
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
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
