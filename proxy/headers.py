"""Pure functions on raw ASGI header lists (``list[tuple[bytes, bytes]]``, lower-case names).

Lists stay lists: duplicate headers (``set-cookie``, ``vary``) matter.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

HeaderList = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 plus the de-facto ones nginx and Go's ReverseProxy drop.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Never sent upstream: the client's credentials, and what the HTTP client sets itself.
REQUEST_DROP = HOP_BY_HOP | {b"host", b"authorization", b"content-length", b"expect"}

# Never copied to the client: framing is the server's, and so are date and server.
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}

REQUEST_ID = b"x-request-id"
_REQUEST_ID_OK = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (they are hop-by-hop for this message)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def strip_headers(headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes]) -> HeaderList:
    headers = list(headers)
    extra = connection_tokens(headers)
    if extra:
        drop = drop | extra
    return [(n, v) for n, v in headers if n not in drop]


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The client's ``X-Request-Id`` if it is sane, else a fresh one."""
    for name, value in headers:
        if name == REQUEST_ID:
            if _REQUEST_ID_OK.match(value):
                return value
            break
    return os.urandom(16).hex().encode()  # as random as uuid4().hex, without the UUID object


def upstream_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]], *, api_key: bytes, request_id: bytes
) -> HeaderList:
    """What goes upstream: end-to-end client headers, our key instead of theirs, the request id."""
    out = [(n, v) for n, v in strip_headers(client_headers, REQUEST_DROP) if n != REQUEST_ID]
    if api_key:
        out.append((b"authorization", b"Bearer " + api_key))
    out.append((REQUEST_ID, request_id))
    return out


def client_response_headers(upstream_headers: Iterable[tuple[bytes, bytes]]) -> HeaderList:
    """What goes back: end-to-end upstream headers (the access log adds our request id)."""
    return [(n, v) for n, v in strip_headers(upstream_headers, RESPONSE_DROP) if n != REQUEST_ID]


# What uvicorn refuses to write (it raises mid-response): tokens only in names, and no
# control characters but tab in values.
_BAD_NAME = re.compile(rb'[\x00-\x20\x7f()<>@,;:\[\]={}\\"]')
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def writable(headers: HeaderList) -> bool:
    """Whether every name is a token and no value holds a control character (one regex
    search over all names, one over all values)."""
    if not headers:
        return True
    names, values = zip(*headers, strict=True)
    return not (_BAD_NAME.search(b"_".join(names)) or _BAD_VALUE.search(b"\t".join(values)))


def get_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def get_all(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def headers_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes of header names and values, as they would be relayed (``: `` and CRLF counted)."""
    return sum(len(n) + len(v) + 4 for n, v in headers)
