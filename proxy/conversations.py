"""``/conversations``: create, list, read and delete the caller's conversations (SPEC §10).

=========================  =====================================================
``POST /conversations``    ``{"messages"?: [...], "metadata"?: {str: str}}`` → the
                           new conversation (with its messages)
``GET /conversations``     the caller's, newest first: ``?limit=20&after=<id>``
                           → ``{"object": "list", "data", "first_id", "last_id",
                           "has_more"}`` (pass ``last_id`` as ``after`` for the next page)
``GET /conversations/ID``  one conversation with its messages
``DELETE /conversations/ID``  ``{"id", "object": "conversation.deleted", "deleted": true}``
=========================  =====================================================

A key sees only its own conversations: another key's id is a 404, as is an
expired or deleted one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson

from proxy.accesslog import request_info
from proxy.asgi import Receive, Scope, Send
from proxy.chatrequest import check_messages
from proxy.errors import BadRequest, ClientError, GatewayError, MethodNotAllowed, send_json
from proxy.history import ConversationNotFound, History, check_id, owner_of, public
from proxy.passthrough import Relay

MAX_METADATA = 16


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata: at most 16 string pairs, keys <= 64 and values <= 512 chars."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'metadata' must be an object of strings", param="metadata")
    if len(value) > MAX_METADATA:
        raise BadRequest(f"'metadata' may hold at most {MAX_METADATA} keys", param="metadata")
    for k, v in value.items():
        if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise BadRequest(
                "'metadata' keys must be at most 64 characters and values strings of at most 512",
                param=f"metadata.{k[:64]}",
            )
    return value


def _limit(raw: str | None) -> int:
    if raw is None:
        return 20
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise BadRequest("'limit' must be an integer from 1 to 100", param="limit")
    return value


class Conversations:
    """``/conversations`` and ``/conversations/{conversation_id}``."""

    def __init__(self, history: History, relay: Relay) -> None:
        self.history = history
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = request_info(scope)
        owner = owner_of(info.key)
        cid = scope.get("path_params", {}).get("conversation_id")
        method = scope["method"]
        try:
            if cid is None:
                if method == "POST":
                    body = await self.relay.read_request(scope, receive, send, info)
                    if body is None:
                        return
                    answer = await self._create(owner, body)
                elif method in ("GET", "HEAD"):
                    answer = await self._list(owner, scope)
                else:
                    raise MethodNotAllowed("use GET or POST /conversations")
            else:
                if method in ("GET", "HEAD"):
                    answer = public(await self.history.load(owner, _id(cid)), messages=True)
                elif method == "DELETE":
                    if not await self.history.delete(owner, _id(cid)):
                        raise ConversationNotFound(f"no conversation '{cid}'")
                    answer = {"id": cid, "object": "conversation.deleted", "deleted": True}
                else:
                    raise MethodNotAllowed("use GET or DELETE /conversations/{id}")
        except MethodNotAllowed as exc:
            allow = b"GET, POST" if cid is None else b"GET, DELETE"
            await exc.send(send, [(b"allow", allow)])
            return
        except GatewayError as exc:
            await exc.send(send)
            return
        await send_json(send, 200, orjson.dumps(answer))

    async def _create(self, owner: str, body: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}", param="body") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object", param="body")
        unknown = sorted(set(data) - {"messages", "metadata"})
        if unknown:
            raise BadRequest(
                f"unknown field '{unknown[0]}' (known: messages, metadata)", param=unknown[0]
            )
        messages = data.get("messages")
        if messages is None:
            messages = []
        elif messages != []:
            check_messages(messages)
        record = await self.history.create(owner, messages, _metadata(data.get("metadata")))
        return public(record, messages=True)

    async def _list(self, owner: str, scope: Scope) -> dict[str, Any]:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        limit = _limit(query.get("limit", [None])[0])
        after = query.get("after", [None])[0]
        if after is not None:
            check_id(after, "after")
        records, more = await self.history.page(owner, limit, after)
        data = [public(r, messages=False) for r in records]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }


def _id(cid: str) -> str:
    try:
        return check_id(cid, "conversation_id")
    except ClientError:
        # A path that cannot be an id names no conversation: 404, as OpenAI answers.
        raise ConversationNotFound(f"no conversation '{cid[:80]}'") from None
