"""Which ``/v1/*`` paths the gateway relays: an allow-list, checked before anything is read.

By default only what an inference client needs is exposed (:data:`INFERENCE_PATHS`);
``VLLM_WRAPPER_EXTRA_PATHS`` adds paths and ``VLLM_WRAPPER_PROXY_ALL`` relays every
path. vLLM's LoRA administration endpoints (:data:`ADMIN_PATHS`) stay closed unless
``VLLM_WRAPPER_ALLOW_ADMIN`` is set, whatever the other two say.

A pattern is a path relative to ``/v1``; a ``*`` segment matches exactly one
segment (``/models/*`` matches ``/models/llama`` but not ``/models`` or
``/models/a/b``). A trailing ``/`` on the request path is ignored when matching.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.errors import BadRequest, ClientError, Forbidden, MethodNotAllowed, NotFound

INFERENCE_PATHS: tuple[str, ...] = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/models",
    "/models/*",
    "/responses",
    "/responses/*",
    "/responses/*/cancel",
    "/responses/*/input_items",
    "/score",
    "/rerank",
    "/tokenize",
    "/detokenize",
    "/audio/transcriptions",
    "/audio/translations",
)

# Allowed under /v1 but served by vLLM at its root: relayed to {root}/tokenize (also as
# the gateway's own /tokenize and /detokenize).
ROOT_PATHS = frozenset({"/tokenize", "/detokenize"})

# What OpenAI-style clients send; TRACE, CONNECT, PUT, PATCH, WebDAV... are never relayed
# unless VLLM_WRAPPER_PROXY_ALL is set.
METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "OPTIONS"})
_ALLOW = ", ".join(sorted(METHODS)).encode()

# vLLM's administrative endpoints under /v1: off unless VLLM_WRAPPER_ALLOW_ADMIN.
ADMIN_PATHS = frozenset({"/load_lora_adapter", "/unload_lora_adapter"})


def _split(path: str) -> tuple[str, ...]:
    """Segments of ``path`` without its leading and one trailing ``/`` (``//`` stays visible)."""
    path = path.removeprefix("/")
    if path.endswith("/"):
        path = path[:-1]
    return tuple(path.split("/"))


class Exposure:
    """Decides, from the decoded sub-path after ``/v1``, whether a request may be relayed."""

    def __init__(
        self,
        extra: Iterable[str] = (),
        *,
        proxy_all: bool = False,
        allow_admin: bool = False,
        prefix: str = "/v1",
    ) -> None:
        patterns = [*INFERENCE_PATHS, *extra]
        if allow_admin:
            patterns.extend(ADMIN_PATHS)
        self._exact = frozenset(_split(p) for p in patterns if "*" not in _split(p))
        self._wild = tuple(_split(p) for p in patterns if "*" in _split(p))
        self.proxy_all = proxy_all
        self.allow_admin = allow_admin
        self.prefix = prefix

    def allows(self, sub: str) -> bool:
        parts = _split(sub)
        if parts in self._exact:
            return True
        return any(
            len(w) == len(parts) and all(a in ("*", b) and b for a, b in zip(w, parts, strict=True))
            for w in self._wild
        )

    def check(self, method: str, sub: str) -> ClientError | None:
        """None when ``method`` on ``sub`` may be relayed, else the error to answer with."""
        segments = sub.split("/")
        if ".." in segments or "." in segments:
            return BadRequest("path must not contain '.' or '..' segments")
        if "\x00" in sub:
            return BadRequest("path must not contain NUL bytes")
        if not self.allow_admin and sub.rstrip("/") in ADMIN_PATHS:
            return Forbidden(
                f"{self.prefix}{sub} is an administrative endpoint and is disabled on this "
                "gateway (set VLLM_WRAPPER_ALLOW_ADMIN=true to enable it)"
            )
        if self.proxy_all:
            return None
        if method not in METHODS:
            return MethodNotAllowed(
                f"method {method} is not relayed by this gateway", headers=[(b"allow", _ALLOW)]
            )
        if self.allows(sub):
            return None
        return NotFound(
            f"{self.prefix}{sub} is not exposed by this gateway (VLLM_WRAPPER_EXTRA_PATHS or "
            "VLLM_WRAPPER_PROXY_ALL=true widen the list)"
        )
