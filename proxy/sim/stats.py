"""Counters the tests observe (``/_sim/stats``) and ``/metrics`` renders."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

_RECENT_IDS = 100


class Stats:
    """Counters of one simulator app.

    ``requests`` counts every request received on ``/v1/*`` (even rejected
    ones); ``completed`` and ``aborted`` count generations (chat, completions,
    embeddings) that ran to the end or stopped because the client went away;
    ``dropped`` counts connections cut on purpose by ``drop_after_chunks``.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._waiting = 0
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_path: Counter[str] = Counter()
        self.completed = 0
        self.aborted = 0
        self.dropped = 0
        self.open_streams = 0
        self.waiting = 0
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.finished: Counter[str] = Counter()
        self.last_request: dict[str, Any] | None = None
        self.request_ids: deque[str] = deque(maxlen=_RECENT_IDS)
        self._notify()

    def _notify(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    def received(
        self, path: str, method: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        self.requests += 1
        self.by_path[path] += 1
        own = False
        for name, value in headers:
            if name == b"x-request-id":
                self.request_ids.append(value.decode("latin-1"))
            elif name == b"user-agent" and value.startswith(b"vllm-wrapper/"):
                own = True
        if not own:
            # The gateway's own probes (health, model lists) arrive at any moment;
            # they are counted but never hide the last request a client sent.
            self.last_request = {"path": path, "method": method, "headers": headers, "body": body}
        self._notify()

    def update_body(self, body: bytes) -> None:
        if self.last_request is not None:
            self.last_request["body"] = body

    def queued(self, change: int) -> None:
        """A generation entered (+1) or left (-1) the queue for a running slot."""
        self.waiting += change
        self._notify()

    def started(self, prompt_tokens: int) -> None:
        self.open_streams += 1
        self.prompt_tokens += prompt_tokens
        self._notify()

    def ended(self, outcome: str, finish_reasons: Sequence[str] = ()) -> None:
        """``outcome`` is ``completed``, ``aborted`` or ``dropped``."""
        self.open_streams -= 1
        if outcome == "completed":
            self.completed += 1
            self.finished.update(finish_reasons)
        elif outcome == "aborted":
            self.aborted += 1
            self.finished["abort"] += 1
        else:
            self.dropped += 1
        self._notify()

    async def wait_for(self, field: str, n: int, timeout: float) -> bool:
        """Wait until counter ``field`` reaches ``n``; False after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiting += 1
        try:
            while getattr(self, field) < n:
                left = deadline - loop.time()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    return getattr(self, field) >= n
            return True
        finally:
            self._waiting -= 1

    def snapshot(self) -> dict[str, Any]:
        last = self.last_request
        return {
            "requests": self.requests,
            "by_path": dict(self.by_path),
            "completed": self.completed,
            "aborted": self.aborted,
            "dropped": self.dropped,
            "open_streams": self.open_streams,
            "waiting": self.waiting,
            "generation_tokens": self.generation_tokens,
            "prompt_tokens": self.prompt_tokens,
            "last_request": None
            if last is None
            else {
                "path": last["path"],
                "method": last["method"],
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in last["headers"]],
                "body": last["body"].decode("utf-8", "replace"),
            },
            "request_ids": list(self.request_ids),
        }

    def metrics(self, model: str, max_running: int | None = None) -> bytes:
        """Prometheus text exposition, with vLLM's metric names and its real load: running
        and waiting generations, and a KV-cache use of running / ``max_running`` (or 256)."""
        label = f'engine="0",model_name="{model}"'
        kv = min(1.0, self.open_streams / (max_running or 256))
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {float(self.open_streams)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{label}}} {kv}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{label}}} {float(self.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {float(self.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason in ("stop", "length", "abort"):
            lines.append(
                f'vllm:request_success_total{{{label},finished_reason="{reason}"}} '
                f"{float(self.finished[reason])}"
            )
        return ("\n".join(lines) + "\n").encode()
