"""Error bodies in vLLM's wire format, and the exception that carries them.

Three shapes, as vLLM 0.32 sends them:

- ``{"error": {"message", "type", "param", "code"}}`` for request errors
  (``BadRequestError``, ``NotFoundError``, pydantic's ``Bad Request``);
- ``{"detail": ...}`` for routing errors (404, 405), FastAPI's default;
- ``{"error": "Unauthorized"}`` for a missing or wrong API key.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import orjson

_TYPES = {
    400: "BadRequestError",
    401: "UnauthorizedError",
    403: "ForbiddenError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class SimError(Exception):
    """A response to send instead of a generation: status, JSON body, extra headers."""

    def __init__(
        self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = list(headers)


def error_body(message: str, type_: str, param: str | None, code: int) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def bad_request(message: str, param: str | None = None) -> SimError:
    return SimError(400, error_body(message, "BadRequestError", param, 400))


def status_error(status: int, message: str | None = None) -> SimError:
    """A vLLM-style error for any status (the fault switches use it)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    type_ = _TYPES.get(status, phrase.replace(" ", "") + "Error")
    msg = message or f"Simulated failure: {status} {phrase}"
    return SimError(status, error_body(msg, type_, None, status))


def model_not_found(model: str, models: Sequence[str]) -> SimError:
    msg = f"The model `{model}` does not exist. Valid aliases: {', '.join(models)}."
    return SimError(404, error_body(msg, "NotFoundError", "model", 404))


def input_repr(value: Any) -> Any:
    """How vLLM shows a rejected input in a validation message."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return value if isinstance(value, str) else str(value)


def validation_error(errors: Sequence[dict[str, Any] | str]) -> SimError:
    """pydantic's errors, rendered the way vLLM renders a ``RequestValidationError``."""
    n = len(errors)
    lines = "\n".join(f"  {e}" for e in errors)
    message = f"{n} validation error{'s' if n != 1 else ''}:\n{lines}"
    first = errors[0]
    param = first.get("loc") if isinstance(first, dict) else None
    return SimError(400, error_body(message, "Bad Request", param, 400))


NOT_FOUND = b'{"detail":"Not Found"}'
METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
UNAUTHORIZED = b'{"error":"Unauthorized"}'
