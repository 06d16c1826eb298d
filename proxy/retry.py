"""Retry policy: what is retried, how long to wait, and the send-with-retry loop.

Retries happen only *before* the response starts: :func:`send_with_retry`
returns an upstream response whose headers are in and whose body has not been
read, and the caller never retries once it has sent anything to the client.
So a generation is never duplicated or spliced.

Retried: connection refused/reset, connect timeouts, a pooled connection the
upstream closed, and upstream 502/503/504, and 429 *with* ``Retry-After``.
Not retried: read timeouts (the upstream has the request and may be
generating), 429 without ``Retry-After``, any other status.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from proxy.config import Settings
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.headers import get_header
from proxy.upstream import UpstreamResponse

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 3
    backoff: float = 0.25
    backoff_max: float = 4.0
    retry_after_max: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_retries=settings.max_retries,
            backoff=settings.retry_backoff,
            backoff_max=settings.retry_backoff_max,
            retry_after_max=settings.retry_after_max,
        )

    def backoff_delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in ``[0, min(max, base * 2**retry)]`` for retry 0, 1, 2..."""
        return rng() * min(self.backoff_max, self.backoff * (2**retry))

    def delay(
        self, retry: int, retry_after: float | None, rng: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max)
        return self.backoff_delay(retry, rng)


def should_retry_status(status: int, retry_after: float | None) -> bool:
    return status in RETRY_STATUSES or (status == 429 and retry_after is not None)


def parse_retry_after(value: bytes | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetriesExhausted(UpstreamUnavailable):
    """The upstream kept answering a retryable status."""


async def send_with_retry(
    attempt: Callable[[], Awaitable[UpstreamResponse]],
    policy: RetryPolicy,
    *,
    on_attempt: Callable[[int], None] | None = None,
) -> UpstreamResponse:
    """Call ``attempt`` until it gives a non-retryable answer or retries run out.

    Returns a response with headers in (its body unread) or raises
    :class:`UpstreamError` (503/504) saying what happened.
    """
    tries = policy.max_retries + 1
    for retry in range(tries):
        if on_attempt is not None:
            on_attempt(retry + 1)
        last = retry == tries - 1
        try:
            response = await attempt()
        except UpstreamError as exc:
            if not exc.retryable or last:
                if retry:
                    exc.message = f"{exc.message} (after {retry + 1} attempts)"
                raise
            log.info("upstream attempt %d failed: %s; retrying", retry + 1, exc.message)
            await anyio.sleep(policy.delay(retry, None))
            continue
        retry_after = parse_retry_after(get_header(response.headers, b"retry-after"))
        if not should_retry_status(response.status, retry_after):
            return response
        await response.aclose()
        if last:
            cls = UpstreamTimeout if response.status == 504 else RetriesExhausted
            headers = []
            if retry_after is not None:
                headers.append((b"retry-after", str(int(retry_after + 0.999)).encode()))
            raise cls(
                f"upstream unavailable: it answered {response.status} to all {tries} attempts",
                headers=headers,
            )
        log.info("upstream answered %d; retry %d/%d", response.status, retry + 1, tries - 1)
        await anyio.sleep(policy.delay(retry, retry_after))
    raise AssertionError("unreachable")
