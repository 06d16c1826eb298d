"""``Idempotency-Key`` on POST (SPEC §12): a client's retry never starts a second generation.

The first request with a key claims it in the state (set-if-absent, an in-progress
record with the request's fingerprint that expires after ``idempotency_lease`` seconds
should its gateway die). When it ends:

* with a complete 200 answer, the record becomes that answer, kept
  ``idempotency_ttl`` seconds (24 h): a repeat with the same key and body gets it again,
  with ``idempotent-replayed: true`` — streams as the same SSE bytes;
* otherwise (an error, a stream cut short, a client that left) the record is deleted,
  so a retry runs again.

A repeat while the first still runs gets 409 ``idempotency_in_progress``; the same key
with another method, path or body gets 422 ``idempotency_key_reused``. Keys are scoped
to the caller's API key (another key's identical ``Idempotency-Key`` is another record).
When the state cannot answer the request runs without idempotency (logged).
"""

from __future__ import annotations

import hashlib

from proxy.accesslog import RequestInfo
from proxy.cache import Stored, Throttled, owner
from proxy.errors import BadRequest, Conflict, Unprocessable
from proxy.state import State, StateUnavailable

PENDING, DONE = b"P", b"D"
_FP = 64  # hex digits of the fingerprint
MAX_KEY_LENGTH = 255


class Attempt:
    """The first request's claim on an idempotency key."""

    __slots__ = ("fingerprint", "key", "settled")

    def __init__(self, key: str, fingerprint: bytes) -> None:
        self.key = key
        self.fingerprint = fingerprint
        self.settled = False


def check_key(value: bytes) -> str:
    """The header's value as text; 400 unless 1-255 visible ASCII characters."""
    if not 0 < len(value) <= MAX_KEY_LENGTH or not all(33 <= b <= 126 for b in value):
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return value.decode("ascii")


class Idempotency:
    """Idempotency records in a :class:`State` (module docstring)."""

    def __init__(self, state: State, *, ttl: float, lease: float) -> None:
        self.state = state
        self.ttl = ttl
        self.lease = lease
        self.failed = Throttled("idempotency")

    async def begin(
        self, info: RequestInfo, method: str, path: str, body: bytes, value: bytes
    ) -> Attempt | Stored | None:
        """Claim the key (an :class:`Attempt`: run the request), or the stored answer to
        replay; raises 409 / 422 / 400. None: the state failed, run without idempotency."""
        name = hashlib.sha256(check_key(value).encode()).hexdigest()
        key = f"idem:{owner(info)}:{name}"
        fingerprint = (
            hashlib.sha256(method.encode() + b"\0" + path.encode() + b"\0" + body)
            .hexdigest()
            .encode()
        )
        try:
            for _ in range(3):
                if await self.state.put(
                    key, PENDING + fingerprint, self.lease, only_if_absent=True
                ):
                    return Attempt(key, fingerprint)
                record = await self.state.get(key)
                if record is None:
                    continue  # it expired (or was released) between the two calls
                if record[1 : 1 + _FP] != fingerprint:
                    raise Unprocessable(
                        "this Idempotency-Key was already used with a different request body; "
                        "use a new key for a new request",
                        param="Idempotency-Key",
                        code="idempotency_key_reused",
                    )
                if record[:1] == PENDING:
                    raise Conflict(
                        "a request with this Idempotency-Key is still being processed; "
                        "retry after it completes",
                        param="Idempotency-Key",
                        code="idempotency_in_progress",
                        headers=[(b"retry-after", b"1")],
                    )
                stored = Stored.decode(record[1 + _FP :])
                if stored is not None:
                    return stored
                await self.state.delete(key)  # unreadable: start over
        except StateUnavailable as exc:
            self.failed(exc)
        return None

    async def finish(self, attempt: Attempt, answer: Stored | None) -> None:
        """Keep the answer for repeats, or (None) release the key for a retry."""
        if answer is None:
            await self.release(attempt)
            return
        attempt.settled = True
        try:
            await self.state.put(
                attempt.key, DONE + attempt.fingerprint + answer.encode(), self.ttl
            )
        except StateUnavailable as exc:
            self.failed(exc)

    async def release(self, attempt: Attempt) -> None:
        attempt.settled = True
        try:
            await self.state.delete(attempt.key)
        except StateUnavailable as exc:
            self.failed(exc)
