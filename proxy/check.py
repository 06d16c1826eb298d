"""``python -m proxy check URL [--key K]``: probe a running gateway as a client would.

What an operator runs after ``modal deploy`` (or any deployment): ``/health``,
``/models``, a short ``/chat``, a short streamed ``/chat`` with its time to first
token, and what the gateway answers without a key. Prints one line per check and
a verdict; :func:`run_check` returns the exit status (0 when nothing failed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import orjson

OK, WARN, FAIL = "ok", "WARN", "FAIL"
PROMPT = [{"role": "user", "content": "Say hello in five words."}]


@dataclass
class Result:
    name: str
    outcome: str  # OK, WARN or FAIL
    detail: str


def _error_text(status: int, body: bytes) -> str:
    try:
        error = orjson.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}: {message}"


class Checker:
    def __init__(self, session: aiohttp.ClientSession, url: str, key: str, model: str | None):
        self.session = session
        self.url = url.rstrip("/")
        self.auth = {"authorization": f"Bearer {key}"} if key else {}
        self.key = key
        self.model = model

    async def health(self) -> Result:
        async with self.session.get(self.url + "/health") as r:
            body = await r.read()
        if r.status != 200:
            return Result("health", FAIL, _error_text(r.status, body))
        data = orjson.loads(body)
        self.model = self.model or data.get("model")
        where = f"model {data.get('model')}, upstream {data.get('base_url')}"
        if data.get("status") != "healthy":
            return Result("health", FAIL, f"unhealthy: {data.get('reason', '?')} ({where})")
        return Result("health", OK, f"healthy ({where})")

    async def models(self) -> Result:
        async with self.session.get(self.url + "/models", headers=self.auth) as r:
            body = await r.read()
        if r.status != 200:
            return Result("models", FAIL, self._hint(r.status, body))
        ids = [m.get("id") for m in orjson.loads(body).get("data", [])]
        if self.model and self.model not in ids:
            return Result("models", FAIL, f"{self.model} is not among {ids}")
        return Result("models", OK, f"{len(ids)} served: {', '.join(map(str, ids))}")

    def _body(self, stream: bool) -> dict:
        body: dict = {"messages": PROMPT, "max_tokens": 16, "stream": stream}
        if self.model:
            body["model"] = self.model
        return body

    async def chat(self) -> Result:
        start = time.perf_counter()
        async with self.session.post(
            self.url + "/chat", json=self._body(False), headers=self.auth
        ) as r:
            body = await r.read()
        took = time.perf_counter() - start
        if r.status != 200:
            return Result("chat", FAIL, self._hint(r.status, body))
        data = orjson.loads(body)
        tokens = (data.get("usage") or {}).get("completion_tokens")
        text = " ".join(str(data.get("content", "")).split())[:60]
        return Result("chat", OK, f"{text!r} ({tokens} tokens in {took:.2f} s)")

    async def stream(self) -> Result:
        start = time.perf_counter()
        first: float | None = None
        events = 0
        done = False
        async with self.session.post(
            self.url + "/chat", json=self._body(True), headers=self.auth
        ) as r:
            if r.status != 200:
                return Result("stream", FAIL, self._hint(r.status, await r.read()))
            async for line in r.content:
                if not line.startswith(b"data:"):
                    if line.startswith(b"event: error"):
                        return Result("stream", FAIL, "the stream ended with an error event")
                    continue
                if line.strip() == b"data: [DONE]":
                    done = True
                    break
                events += 1
                if first is None:
                    first = time.perf_counter() - start
        total = time.perf_counter() - start
        if not done:
            return Result("stream", FAIL, f"ended without [DONE] after {events} events")
        ttft = f"{first:.3f} s" if first is not None else "-"
        return Result("stream", OK, f"first token after {ttft}, {events} events in {total:.2f} s")

    async def auth_check(self) -> Result:
        async with self.session.post(self.url + "/chat", json=self._body(False)) as r:
            await r.read()
        if r.status == 401:
            return Result("auth", OK, "without a key: 401 (auth is on)")
        if r.status < 400:
            return Result(
                "auth", WARN, f"without a key: {r.status}: auth is OFF, anyone can use it"
            )
        return Result("auth", WARN, f"without a key: HTTP {r.status} (expected 401)")

    def _hint(self, status: int, body: bytes) -> str:
        text = _error_text(status, body)
        if status == 401:
            return text + (" — the gateway needs a key: pass --key" if not self.key else "")
        return text

    async def run(self) -> list[Result]:
        results = []
        for name, step in (
            ("health", self.health),
            ("models", self.models),
            ("chat", self.chat),
            ("stream", self.stream),
            ("auth", self.auth_check),
        ):
            try:
                results.append(await step())
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                detail = str(exc) or type(exc).__name__
                if isinstance(exc, aiohttp.ClientConnectorError):
                    detail = f"cannot connect to {exc.host}:{exc.port}"
                elif isinstance(exc, TimeoutError):
                    detail = "no answer in time (--timeout)"
                results.append(Result(name, FAIL, detail))
                if isinstance(exc, aiohttp.ClientConnectorError):
                    break  # nothing else can work
        return results


async def check(url: str, *, key: str = "", model: str | None = None, timeout: float = 60.0):
    """Run every check against the gateway at ``url``; the results in order."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        return await Checker(session, url, key, model).run()


def run_check(url: str, *, key: str = "", model: str | None = None, timeout: float = 60.0) -> int:
    """Print the checks and a verdict; the exit status (0: no failure, 1: a failure)."""
    print(f"checking the gateway at {url}")
    results = asyncio.run(check(url, key=key, model=model, timeout=timeout))
    for r in results:
        print(f"  {r.outcome:<4}  {r.name:<7} {r.detail}")
    failed = [r.name for r in results if r.outcome == FAIL]
    warned = [r.name for r in results if r.outcome == WARN]
    if failed:
        print(f"verdict: FAILED ({', '.join(failed)})")
        return 1
    if warned:
        print(f"verdict: works, with warnings ({', '.join(warned)})")
    else:
        print("verdict: OK — the gateway answers as a client expects")
    return 0
