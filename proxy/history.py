"""Conversation history for ``/chat``, over the shared :class:`~proxy.state.State` (SPEC §10).

A conversation is one record (JSON) under ``conv:{owner}:{id}``, with a TTL of
``[history] ttl_days`` that every turn renews, plus a member in the owner's index
``convs:{owner}`` (newest first by creation time, which the id carries, so a
page's last id is the next page's cursor). ``owner`` is the caller's key name, or
``-`` when client auth is off (then every caller shares one namespace). Another
key's id is simply not found: a 404.

One turn (:meth:`History.begin` → :meth:`Conversation.commit` / :meth:`Conversation.release`):

1. take the turn's lock ``conv-lock:{id}`` (expires after ``lock_seconds``, renewed
   while the answer runs; a gateway that dies leaves it to expire): else 409
   ``conversation_busy``;
2. read the record (one state read), put the stored messages before the new ones
   and trim them to the model's context (:class:`Fitter`);
3. when the answer is complete, write the record with the new user and assistant
   messages (one state write, one index touch), then unlock — before the answer's
   last byte goes out, so the caller's next turn never finds it busy.

An answer cut short (client gone, upstream failure, an error answer) stores nothing:
the conversation stays as it was before the turn.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from proxy.asgi import Send, with_headers
from proxy.errors import ClientError, GatewayError, NotFound, StateUnavailableError
from proxy.headers import upstream_request_headers
from proxy.state import State, StateSpec, StateUnavailable, open_state

if TYPE_CHECKING:
    from proxy.routing.router import Router
    from proxy.upstream import Upstream

log = logging.getLogger(__name__)

ID = re.compile(r"conv_[0-9a-f]{32}")
NOBODY = "-"  # the owner when client auth is off
_MODELS_TTL = 300.0
_MAX_TOKENIZE_CALLS = 8
# An upper bound of a message's tokens: every token of a byte-level BPE covers at least
# one byte, plus the chat template's few special tokens per message.
_PER_MESSAGE = 16
_PER_PROMPT = 16


@dataclass(frozen=True, slots=True)
class HistorySpec:
    """The ``[history]`` section."""

    path: str = ""  # SQLite file; "" = the [state] path
    ttl_days: float = 30.0
    max_messages: int = 200
    lock_seconds: float = 60.0


class ConversationBusy(ClientError):
    status = 409
    code = "conversation_busy"


class ConversationNotFound(NotFound):
    code = "conversation_not_found"


class InvalidConversation(ClientError):
    status = 400
    code = "invalid_value"


def wants_history(payload: dict[str, Any]) -> bool:
    """Whether a ``/chat`` payload names a conversation or asks to store one."""
    return "conversation_id" in payload or "store" in payload


def history_state_spec(spec: HistorySpec, state: StateSpec) -> StateSpec:
    """Where history lives: Redis when configured, else SQLite (``[history] path``)."""
    if spec.path and state.backend != "redis" and not state.redis_url:
        return StateSpec(backend="sqlite", path=spec.path, timeout=state.timeout)
    return state


def new_id(now: float | None = None) -> str:
    """``conv_`` + creation time (ms, 12 hex digits) + 20 random hex digits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"conv_{ms:012x}{os.urandom(10).hex()}"


def created_ms(conversation_id: str) -> int:
    return int(conversation_id[5:17], 16)


def check_id(value: Any, param: str = "conversation_id") -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise InvalidConversation(
            f"'{param}' must be a conversation id like conv_<32 hex digits>; got {_show(value)}",
            param=param,
        )
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- trimming ----------------------------------------------------------------------------


def estimate(messages: Sequence[dict[str, Any]]) -> int:
    """An upper bound of the prompt's tokens (UTF-8 bytes of the contents + overheads)."""
    total = _PER_PROMPT
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            size = len(content.encode())
        elif content is None:
            size = 0
        else:
            size = len(orjson.dumps(content))
        total += size + _PER_MESSAGE
    return total


def candidates(
    stored: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
) -> list[list[dict[str, Any]]]:
    """The prompts to try, longest first: all of ``stored`` + ``new``, then without the
    oldest turn, and so on, down to the leading system messages + ``new``.

    A turn starts at a user message; the stored leading system messages always stay.
    """
    head = 0
    while head < len(stored) and stored[head].get("role") == "system":
        head += 1
    system, rest = list(stored[:head]), list(stored[head:])
    cuts = [0] + [i for i in range(1, len(rest)) if rest[i].get("role") == "user"]
    cuts.append(len(rest))
    return [system + rest[c:] + list(new) for c in dict.fromkeys(cuts)]


class Fitter:
    """Fits a prompt into the model's context: ``max_model_len`` from the upstream's
    ``/v1/models`` (what the router discovered, else fetched and kept a few minutes),
    exact counts from its ``/tokenize`` (which takes chat ``messages``), but only when
    the cheap upper bound does not fit."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._lens: dict[str, tuple[float, dict[str, int]]] = {}  # base URL -> (when, lens)
        self._lock = asyncio.Lock()

    def _endpoints(self, model: str) -> Sequence[Any]:
        try:
            return self.router.candidates(model)
        except GatewayError:  # no upstream serves the model: the turn will say so
            return ()

    async def max_model_len(self, model: str) -> int | None:
        """The model's context length (the smallest its upstreams report), or None."""
        endpoints = self._endpoints(model)
        known = [
            obj["max_model_len"]
            for e in endpoints
            if isinstance(obj := e.model_objects.get(model), dict)
            and isinstance(obj.get("max_model_len"), int)
        ]
        if known:
            return min(known)
        if not endpoints:
            return None
        upstream = endpoints[0].upstream
        now = time.monotonic()
        seen = self._lens.get(upstream.base_url)
        if seen is None or now - seen[0] >= _MODELS_TTL:
            async with self._lock:
                seen = self._lens.get(upstream.base_url)
                if seen is None or now - seen[0] >= _MODELS_TTL:
                    lens = await _context_lengths(upstream)
                    # A failed read is tried again after 10 s, not 5 minutes.
                    seen = (now if lens else now - _MODELS_TTL + 10.0, lens)
                    self._lens[upstream.base_url] = seen
        return seen[1].get(model)

    async def count(self, model: str, messages: list[dict[str, Any]], rid: bytes) -> int | None:
        """The prompt's exact token count from ``/tokenize``, or None."""
        endpoints = self._endpoints(model)
        if not endpoints:
            return None
        upstream = endpoints[0].upstream
        headers = upstream_request_headers(
            [(b"content-type", b"application/json")], api_key=b"", request_id=rid
        )
        body = orjson.dumps({"model": model, "messages": messages})
        try:
            url = upstream.url("/tokenize", root=True)
            response = await upstream.send("POST", url, headers, body)
            try:
                data = await response.read()
            finally:
                await response.aclose()
            return int(orjson.loads(data)["count"]) if response.status == 200 else None
        except (GatewayError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    async def fit(
        self,
        model: str,
        max_tokens: int,
        stored: list[dict[str, Any]],
        new: list[dict[str, Any]],
        rid: bytes,
    ) -> tuple[list[dict[str, Any]], int]:
        """The longest prompt (oldest turns dropped first) whose tokens plus ``max_tokens``
        fit ``max_model_len``; and how many stored messages it dropped."""
        options = candidates(stored, new)
        full = len(options[0])
        if len(options) == 1:  # nothing stored that could be dropped
            return options[0], 0
        limit = await self.max_model_len(model)  # cached: no round trip per turn
        if limit is None:
            return options[0], 0
        room = limit - max_tokens
        if estimate(options[0]) <= room:
            return options[0], 0
        if room <= 0:  # max_tokens alone fills the context: vLLM's own 400 will say so
            return options[-1], full - len(options[-1])
        # The first option that surely fits by the upper bound; the minimal one otherwise.
        sure = next((i for i, o in enumerate(options) if estimate(o) <= room), len(options) - 1)
        lo, hi, calls = 0, sure, 0  # the answer is in [lo, hi]; options[hi] is known to fit
        while lo < hi and calls < _MAX_TOKENIZE_CALLS:
            mid = (lo + hi) // 2
            calls += 1
            n = await self.count(model, options[mid], rid)
            if n is None:
                break
            if n <= room:
                hi = mid
            else:
                lo = mid + 1
        chosen = options[hi]
        return chosen, full - len(chosen)


async def _context_lengths(upstream: Upstream) -> dict[str, int]:
    """``{model: max_model_len}`` from an upstream's ``/v1/models``; empty when it fails."""
    try:
        status, body = await upstream.fetch(upstream.url("/models"))
        data = orjson.loads(body)["data"] if status == 200 else []
        return {
            m["id"]: m["max_model_len"]
            for m in data
            if isinstance(m, dict) and isinstance(m.get("max_model_len"), int)
        }
    except (GatewayError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        log.warning("cannot read max_model_len from %s: %r", upstream.base_url, exc)
        return {}


# ---- the store ---------------------------------------------------------------------------


def _record_key(owner: str, conversation_id: str) -> str:
    return f"conv:{owner}:{conversation_id}"


def _index_key(owner: str) -> str:
    return f"convs:{owner}"


def owner_of(key: Any) -> str:
    """The namespace of a caller: its key's name, or ``-`` without client auth."""
    return key.name if key is not None else NOBODY


def public(record: dict[str, Any], *, messages: bool) -> dict[str, Any]:
    """A record as the API shows it."""
    out = {
        "id": record["id"],
        "object": "conversation",
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
        "metadata": record.get("metadata") or {},
        "message_count": len(record["messages"]),
    }
    if messages:
        out["messages"] = record["messages"]
    return out


class History:
    """Conversations over a lazily opened :class:`State` (module docstring)."""

    def __init__(self, spec: HistorySpec, state_spec: StateSpec, fitter: Fitter) -> None:
        self.spec = spec
        self.state_spec = history_state_spec(spec, state_spec)
        self.fitter = fitter
        self.ttl = spec.ttl_days * 86400.0
        self._state: State | None = None

    @property
    def state(self) -> State:
        if self._state is None:
            self._state = open_state(self.state_spec)
        return self._state

    async def aclose(self) -> None:
        if self._state is not None:
            await self._state.close()
            self._state = None

    # ---- records -------------------------------------------------------------------------

    async def load(self, owner: str, conversation_id: str) -> dict[str, Any]:
        """The record, or :class:`ConversationNotFound`."""
        raw = await self._call(self.state.get(_record_key(owner, conversation_id)))
        if raw is None:
            raise ConversationNotFound(
                f"no conversation '{conversation_id}'", param="conversation_id"
            )
        return orjson.loads(raw)

    async def save(self, owner: str, record: dict[str, Any]) -> None:
        record["updated_at"] = int(time.time())
        record["messages"] = self._bounded(record["messages"])
        cid = record["id"]
        await self._call(self.state.put(_record_key(owner, cid), orjson.dumps(record), self.ttl))
        await self._call(
            self.state.index_add(_index_key(owner), cid, float(created_ms(cid)), self.ttl)
        )

    def _bounded(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """At most ``max_messages``: whole oldest turns go first, leading system ones stay."""
        if len(messages) <= self.spec.max_messages:
            return messages
        for option in candidates(messages, ()):
            if len(option) <= self.spec.max_messages:
                return option
        return messages[-self.spec.max_messages :]

    async def create(
        self, owner: str, messages: list[dict[str, Any]], metadata: dict[str, str]
    ) -> dict[str, Any]:
        now = time.time()
        record = {
            "id": new_id(now),
            "created_at": int(now),
            "updated_at": int(now),
            "metadata": metadata,
            "messages": messages,
        }
        await self.save(owner, record)
        return record

    async def delete(self, owner: str, conversation_id: str) -> bool:
        found = await self._call(self.state.delete(_record_key(owner, conversation_id)))
        await self._call(self.state.index_remove(_index_key(owner), conversation_id))
        return found

    async def page(
        self, owner: str, limit: int, after: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Up to ``limit`` records newest first after the id ``after``; and whether more."""
        cursor = None if after is None else (float(created_ms(after)), after)
        out: list[dict[str, Any]] = []
        index = _index_key(owner)
        for _ in range(10):  # bounded: expired members are dropped as they are met
            want = limit + 1 - len(out)
            members = await self._call(self.state.index_page(index, want, cursor))
            for cid, score in members:
                cursor = (score, cid)
                raw = await self._call(self.state.get(_record_key(owner, cid)))
                if raw is None:  # expired or deleted: drop it from the index
                    await self._call(self.state.index_remove(index, cid))
                    continue
                out.append(orjson.loads(raw))
            if len(out) > limit or len(members) < want:
                break
        return out[:limit], len(out) > limit

    async def _call(self, work: Any) -> Any:
        try:
            return await work
        except StateUnavailable as exc:
            raise StateUnavailableError(
                f"conversation history is unavailable right now ({exc}); retry later",
                headers=[(b"retry-after", b"1")],
            ) from None

    # ---- one turn ------------------------------------------------------------------------

    async def begin(self, payload: dict[str, Any], key: Any, rid: bytes) -> Conversation | None:
        """Take ``conversation_id`` / ``store`` out of a ``/chat`` payload; for a turn that
        uses history, lock and load the conversation and put its messages (trimmed) in
        the payload. None when the request uses no history. Raises the client's error."""
        cid = payload.pop("conversation_id", None)
        store = payload.pop("store", None)
        if store is not None and not isinstance(store, bool):
            raise InvalidConversation("'store' must be true or false", param="store")
        if cid is None and not store:
            return None
        owner = owner_of(key)
        turn_id = os.urandom(12).hex()
        new = list(payload["messages"])
        if cid is None:
            now = time.time()
            record: dict[str, Any] = {
                "id": new_id(now),
                "created_at": int(now),
                "updated_at": int(now),
                "metadata": {},
                "messages": [],
            }
            lock = _lock_key(record["id"])
            await self._call(self.state.lock(lock, turn_id, self.spec.lock_seconds))
        else:
            check_id(cid)
            lock = _lock_key(cid)
            if not await self._call(self.state.lock(lock, turn_id, self.spec.lock_seconds)):
                raise ConversationBusy(
                    f"conversation '{cid}' is answering another turn; "
                    "send the next one when it has finished",
                    param="conversation_id",
                )
            try:
                record = await self.load(owner, cid)
            except BaseException:
                await self._unlock(lock, turn_id)
                raise
        turn = Conversation(self, owner, record, new, lock, turn_id, keep=store is not False)
        try:
            max_tokens = payload.get("max_tokens")
            max_tokens = max_tokens if isinstance(max_tokens, int) else 0
            prompt, dropped = await self.fitter.fit(
                payload["model"], max_tokens, record["messages"], new, rid
            )
        except BaseException:
            await turn.release()
            raise
        payload["messages"] = prompt
        turn.dropped = dropped
        return turn

    async def _unlock(self, lock: str, turn_id: str) -> None:
        try:
            await self.state.unlock(lock, turn_id)
        except StateUnavailable as exc:
            log.warning("conversation lock not released (%s); it expires by itself", exc)


def _lock_key(conversation_id: str) -> str:
    return f"conv-lock:{conversation_id}"


class Conversation:
    """One running turn of a conversation: holds its lock (renewed) until commit/release."""

    def __init__(
        self,
        history: History,
        owner: str,
        record: dict[str, Any],
        new: list[dict[str, Any]],
        lock: str,
        turn_id: str,
        *,
        keep: bool = True,
    ) -> None:
        self.history = history
        self.keep = keep
        self.owner = owner
        self.record = record
        self.new = new
        self.lock = lock
        self.turn_id = turn_id
        self.dropped = 0
        self.done = False
        self._renewer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._schedule()

    @property
    def id(self) -> str:
        return self.record["id"]

    def wrap(self, send: Send) -> Send:
        """``send`` that adds ``x-conversation-id`` to the response start."""
        return with_headers(send, [(b"x-conversation-id", self.id.encode())])

    def _schedule(self) -> None:
        every = self.history.spec.lock_seconds / 3
        self._renewer = asyncio.get_running_loop().call_later(every, self._renew)

    def _renew(self) -> None:
        state = self.history.state
        task = asyncio.ensure_future(
            state.lock(self.lock, self.turn_id, self.history.spec.lock_seconds)
        )
        self._tasks.add(task)
        task.add_done_callback(self._renewed)
        self._schedule()

    def _renewed(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("conversation lock not renewed: %r", task.exception())

    async def commit(self, answer: str) -> str:
        """Store the new messages and the answer, then unlock. A state failure is logged
        (the answer is out or about to be): the turn is then not stored. With
        ``"store": false`` next to a ``conversation_id`` the turn is answered in context
        but not added."""
        if not self.keep:
            await self.release()
            return self.id
        messages = [*self.record["messages"], *self.new, {"role": "assistant", "content": answer}]
        self.record["messages"] = messages
        try:
            await self.history.save(self.owner, self.record)
        except StateUnavailableError as exc:
            log.warning("conversation %s: turn not stored (%s)", self.id, exc.message)
        await self.release()
        return self.id

    async def release(self) -> None:
        """Unlock without storing (idempotent)."""
        if self.done:
            return
        self.done = True
        if self._renewer is not None:
            self._renewer.cancel()
        for task in self._tasks:
            task.cancel()
        await self.history._unlock(self.lock, self.turn_id)
