"""Admission and charging: rpm, tpm, max_parallel and daily/monthly token quotas per key.

For a request whose key has limits, :meth:`Limiter.admit` builds the key's
claims and reserves them in one call to the shared :class:`~proxy.state.State`
(at most one round trip on Redis, shared with the other calls of its batch):

=================  ==================================================  ==========
limit              state                                               reserves
=================  ==================================================  ==========
``rpm``            sliding 60 s window                                 1
``tpm``            sliding 60 s window                                 estimate
``max_parallel``   a lease per request, renewed while it runs          1 slot
``daily_tokens``   counter for the UTC day  (must have something left)  estimate
``monthly_tokens`` counter for the UTC month                           estimate
=================  ==================================================  ==========

The estimate is the prompt's size (request bytes / 4) plus ``max_tokens`` (or
``max_completion_tokens``, times ``n``; ``[limits] default_max_tokens`` when the
request names none). When the request ends, :meth:`Ticket.finish` corrects the
reservation to the real usage (``RequestInfo.usage``, read by
:class:`proxy.usage.Meter` or ``/chat``; for an answer cut short, the prompt
estimate plus the events seen) and frees the slot: queued with
:meth:`State.settle_soon`, so SQLite and Redis send it with the next batch of
limit calls (``proxy.state.batch``; under load one transaction or one script
call carries many requests' reservations and settlements). Leases of requests
still running are renewed by one timer for all of them. A refused request gets
OpenAI's 429; every response of a limited key carries OpenAI's ``x-ratelimit-*``
headers.

When the state cannot answer: ``on_error = "open"`` admits (logging at most once
a minute, counting ``state_errors``), ``"closed"`` answers 503 ``state_unavailable``.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

import orjson

from proxy.accesslog import RequestInfo, request_info
from proxy.asgi import Receive, Scope, Send, with_headers
from proxy.errors import (
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    ModelNotAllowed,
    NotFound,
    QuotaExceeded,
    RateLimited,
    StateUnavailableError,
    send_json,
)
from proxy.keys import Key, Keys
from proxy.state import (
    COUNTER,
    LEASE,
    WINDOW,
    Claim,
    State,
    StateSpec,
    StateUnavailable,
    open_state,
)
from proxy.usage import Meter, ask_for_usage, wants_usage

log = logging.getLogger(__name__)

GENERATIVE = ("/chat/completions", "/completions", "/responses")
_STREAMED = ("/chat/completions", "/completions")
_LOG_EVERY = 60.0


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes resets: ``12ms``, ``1s``, ``9.816s``, ``6m0s``, ``1h2m3.5s``."""
    ms = max(round(seconds * 1000), 0)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return out + secs + "s"


def calendar(now: float) -> tuple[str, float, str, float]:
    """(day id, seconds to the end of the UTC day, month id, seconds to the month's end)."""
    day, day_end, month, month_end = _utc_day(int(now // 86400))
    return day, day_end - now, month, month_end - now


@functools.lru_cache(maxsize=4)
def _utc_day(days: int) -> tuple[str, float, str, float]:
    """Day ``days`` since the epoch (UTC; Unix time has 86 400 s a day): its id and end,
    its month's id and end. Computed once a day, not per request."""
    t = datetime.datetime.fromtimestamp(days * 86400, datetime.UTC)
    month_end = datetime.datetime(
        t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=datetime.UTC
    )
    return t.strftime("%Y-%m-%d"), (days + 1) * 86400.0, t.strftime("%Y-%m"), month_end.timestamp()


def claims_for(key: Key, lease_seconds: float, estimate: int, now: float) -> list[Claim]:
    """The key's limits as state claims; ``estimate`` tokens reserved."""
    lim = key.limits
    n = key.name
    claims = []
    if lim.rpm is not None:
        claims.append(Claim(f"{n}:rpm", WINDOW, lim.rpm, 60.0))
    if lim.tpm is not None:
        claims.append(
            Claim(f"{n}:tpm", WINDOW, lim.tpm, 60.0, amount=estimate, need=min(estimate, lim.tpm))
        )
    if lim.max_parallel is not None:
        claims.append(Claim(f"{n}:par", LEASE, lim.max_parallel, lease_seconds))
    if lim.daily_tokens is not None or lim.monthly_tokens is not None:
        day, to_day_end, month, to_month_end = calendar(now)
        if lim.daily_tokens is not None:
            claims.append(
                Claim(f"{n}:d:{day}", COUNTER, lim.daily_tokens, to_day_end, estimate, need=1)
            )
        if lim.monthly_tokens is not None:
            claims.append(
                Claim(f"{n}:m:{month}", COUNTER, lim.monthly_tokens, to_month_end, estimate, need=1)
            )
    return claims


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def estimate_tokens(body: bytes, parsed: dict[str, Any] | None, path: str, default: int) -> int:
    """The prompt's size estimate plus what the answer may use."""
    prompt = len(body) // 4
    if parsed is None or path not in GENERATIVE:
        return prompt
    answer = _int(parsed.get("max_tokens"))
    if answer is None:
        answer = _int(parsed.get("max_completion_tokens"))
    if answer is None:
        answer = _int(parsed.get("max_output_tokens"))
    n = _int(parsed.get("n")) or 1
    return prompt + (default if answer is None else answer) * n


_RPM_HEADERS = (
    b"x-ratelimit-limit-requests",
    b"x-ratelimit-remaining-requests",
    b"x-ratelimit-reset-requests",
)
_TPM_HEADERS = (
    b"x-ratelimit-limit-tokens",
    b"x-ratelimit-remaining-tokens",
    b"x-ratelimit-reset-tokens",
)


def ratelimit_headers(claims: Sequence[Claim], used: Sequence[int], reset: Sequence[float]):
    """OpenAI's ``x-ratelimit-*`` headers for the rpm and tpm claims."""
    headers: list[tuple[bytes, bytes]] = []
    for claim, u, r in zip(claims, used, reset, strict=True):
        if claim.kind != WINDOW:
            continue
        limit, remaining, reset_name = _RPM_HEADERS if claim.key.endswith(":rpm") else _TPM_HEADERS
        headers += (
            (limit, b"%d" % claim.limit),
            (remaining, b"%d" % max(claim.limit - u, 0)),
            (reset_name, go_duration(r).encode()),
        )
    return headers


class Ticket:
    """An admitted request's reservation: headers to send, usage to read, a charge to correct."""

    __slots__ = (
        "body",
        "claims",
        "headers",
        "leases",
        "limiter",
        "prompt",
        "renewed",
        "rid",
        "strip",
    )

    def __init__(
        self,
        limiter: Limiter,
        rid: str,
        claims: list[Claim],
        headers: list[tuple[bytes, bytes]],
        prompt: int,
        body: bytes,
        strip: bool,
    ) -> None:
        self.limiter = limiter
        self.rid = rid
        self.claims = claims
        self.headers = headers
        self.prompt = prompt
        self.body = body
        self.strip = strip
        self.leases = [c for c in claims if c.kind == LEASE]
        self.renewed = time.monotonic()
        if self.leases:
            limiter.hold(self)

    def wrap(self, send: Send) -> Send:
        """``send`` that adds the rate-limit headers to the response start."""
        return with_headers(send, self.headers)

    def meter(self, info: RequestInfo, *, stream: bool) -> Meter:
        return Meter(info, stream=stream, strip=self.strip and stream)

    def finish(self, info: RequestInfo) -> None:
        """Correct the reservation to the real usage and free the slot (queued: the
        state sends it with its next batch)."""
        if self.leases:
            self.limiter.release(self)
        if info.usage is not None:
            total = info.usage[0] + info.usage[1]
        elif info.generated:
            total = self.prompt + max(info.generated - 1, 0)  # role chunk; [DONE] not seen
        else:
            total = 0  # refused or failed upstream: nothing generated
        actual = [1 if c.key.endswith(":rpm") or c.kind == LEASE else total for c in self.claims]
        limiter = self.limiter
        limiter.state.settle_soon(self.rid, self.claims, actual, limiter.failed)


class Limiter:
    """Admission for keys with limits, over a lazily opened :class:`State`."""

    def __init__(self, keys: Keys, spec: StateSpec, state: State | None = None) -> None:
        self.keys = keys
        self.spec = spec
        self._state = state
        self._pending: set[asyncio.Task[None]] = set()
        self._held: dict[str, Ticket] = {}
        self._renewer: asyncio.TimerHandle | None = None
        self.state_errors = 0
        self._logged = -math.inf

    @property
    def state(self) -> State:
        if self._state is None:
            self._state = open_state(self.spec)
        return self._state

    def failed(self, exc: StateUnavailable) -> None:
        """Count (and at most once a minute log) a state call that failed."""
        self.state_errors += 1
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY:
            self._logged = now
            log.warning(
                "state %s unavailable (%s); on_error=%s (%d failures so far)",
                self.spec.backend or "default",
                exc,
                self.spec.on_error,
                self.state_errors,
            )

    async def admit(
        self, key: Key, info: RequestInfo, body: bytes, path: str, parsed: dict[str, Any] | None
    ) -> Ticket | None:
        """Check the key's model list and limits; raise the client's error when refused.

        Returns None when nothing needs tracking (no limits, or the state is down and
        ``on_error = "open"``).
        """
        if parsed is not None:
            model = parsed.get("model")
            if isinstance(model, str):
                info.model = model
                if key.models is not None and model not in key.models:
                    raise ModelNotAllowed(
                        f"the key '{key.name}' may not use model '{model}'", param="model"
                    )
        if not key.limits.any:
            return None
        limits = self.keys.ring.limits
        estimate = estimate_tokens(body, parsed, path, limits.default_max_tokens)
        claims = claims_for(key, limits.lease_seconds, estimate, time.time())
        rid = os.urandom(12).hex()
        try:
            outcome = await self.state.reserve(rid, claims)
        except StateUnavailable as exc:
            self.failed(exc)
            if self.spec.on_error == "closed":
                raise StateUnavailableError(
                    "rate limits cannot be checked right now (state unavailable); retry later",
                    headers=[(b"retry-after", b"1")],
                ) from None
            return None
        headers = ratelimit_headers(claims, outcome.used, outcome.reset)
        if not outcome.admitted:
            assert outcome.refused is not None
            raise refusal(key, claims[outcome.refused], outcome, headers)
        strip = False
        if (
            key.limits.tokens
            and parsed is not None
            and parsed.get("stream") is True
            and path in _STREAMED
            and not wants_usage(parsed)
        ):
            body = ask_for_usage(body, parsed)
            strip = True
        return Ticket(self, rid, claims, headers, len(body) // 4, body, strip)

    def hold(self, ticket: Ticket) -> None:
        """Keep ``ticket``'s leases renewed until :meth:`release`: one timer for all
        tickets, firing every sixth of the lease time while any is held, renews each
        lease a third to half of its time after it was taken or last renewed."""
        self._held[ticket.rid] = ticket
        if self._renewer is None:
            self._arm()

    def release(self, ticket: Ticket) -> None:
        self._held.pop(ticket.rid, None)

    def _arm(self) -> None:
        every = self.keys.ring.limits.lease_seconds / 6
        self._renewer = asyncio.get_running_loop().call_later(every, self._renew_due)

    def _renew_due(self) -> None:
        self._renewer = None
        if not self._held:
            return
        now = time.monotonic()
        for ticket in list(self._held.values()):
            if now - ticket.renewed >= min(c.seconds for c in ticket.leases) / 3:
                ticket.renewed = now
                self.run_later(self._renew(ticket.rid, ticket.leases))
        self._arm()

    async def _renew(self, rid: str, claims: list[Claim]) -> None:
        try:
            await self.state.renew(rid, claims)
        except StateUnavailable as exc:
            self.failed(exc)

    def run_later(self, work: Any) -> None:
        """Run a coroutine in the background, kept until done (``aclose`` waits for it)."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def usage(self, key: Key) -> dict[str, Any]:
        """The key's limits and current use (``GET /usage``)."""
        limits = self.keys.ring.limits
        claims = claims_for(key, limits.lease_seconds, 0, time.time())
        seen = await self.state.peek(claims) if claims else []
        names = {
            ":rpm": "requests_per_minute",
            ":tpm": "tokens_per_minute",
            ":par": "in_flight",
            ":d:": "tokens_today",
            ":m:": "tokens_this_month",
        }
        use: dict[str, int] = {}
        resets: dict[str, str] = {}
        for claim, (used, reset) in zip(claims, seen, strict=True):
            label = next(v for k, v in names.items() if k in claim.key)
            use[label] = used
            resets[label] = go_duration(reset)
        return {"name": key.name, "limits": key.limits.as_dict(), "usage": use, "resets": resets}

    async def aclose(self, timeout: float = 5.0) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout)
        if self._state is not None:
            await self._state.close()
            self._state = None


def refusal(key: Key, claim: Claim, outcome: Any, headers: list[tuple[bytes, bytes]]):
    """The 429 for a refused claim, as OpenAI words and heads it."""
    i = outcome.refused
    used = outcome.used[i]
    if claim.kind == COUNTER:
        period = "daily" if ":d:" in claim.key else "monthly"
        return QuotaExceeded(
            f"You exceeded the {period} token quota of key '{key.name}' "
            f"(limit {claim.limit}, used {used}); it resets in {go_duration(claim.seconds)}.",
            headers=[*headers, (b"x-should-retry", b"false")],
        )
    wait = outcome.retry_after if claim.kind == WINDOW else 1.0
    wait = max(wait, 0.001)
    retry = [
        (b"retry-after", str(math.ceil(wait)).encode()),
        (b"retry-after-ms", str(math.ceil(wait * 1000)).encode()),
    ]
    if claim.kind == LEASE:
        return RateLimited(
            f"Too many requests in flight for key '{key.name}': limit {claim.limit} "
            f"(max_parallel). Please try again when one finishes.",
            headers=[*headers, *retry],
        )
    tokens = claim.key.endswith(":tpm")
    what = "tokens per min (TPM)" if tokens else "requests per min (RPM)"
    return RateLimited(
        f"Rate limit reached for key '{key.name}' on {what}: Limit {claim.limit}, "
        f"Used {used}, Requested {claim.required}. "
        f"Please try again in {go_duration(wait)}.",
        type="tokens" if tokens else "requests",
        headers=[*headers, *retry],
    )


class UsageEndpoint:
    """``GET /usage``: the calling key's limits and use; an admin key sees every key
    (``?key=NAME`` for one)."""

    def __init__(self, keys: Keys, limiter: Limiter) -> None:
        self.keys = keys
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await MethodNotAllowed("use GET /usage").send(send, [(b"allow", b"GET")])
            return
        caller: Key | None = request_info(scope).key
        ring = self.keys.ring
        wanted = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [None])[0]
        try:
            if caller is not None and not caller.admin:
                if wanted not in (None, caller.name):
                    raise Forbidden("only an admin key may read another key's usage")
                chosen = [caller]
            elif wanted is not None:
                if wanted not in ring.by_name:
                    raise NotFound(f"no key named '{wanted}'", param="key")
                chosen = [ring.by_name[wanted]]
            else:
                chosen = list(ring.by_name.values())
            entries = [await self.limiter.usage(k) for k in chosen]
        except StateUnavailable:
            await StateUnavailableError("usage cannot be read right now (state unavailable)").send(
                send
            )
            return
        except GatewayError as exc:
            await exc.send(send)
            return
        await send_json(send, 200, orjson.dumps({"object": "usage", "keys": entries}))
