"""The three vLLM gauges load-aware routing reads, from Prometheus text exposition.

vLLM names them ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc`` (older releases: ``vllm:gpu_cache_usage_perc``), one
series per engine and model; a server's figure is the sum (the mean for the cache).
"""

from __future__ import annotations

_NAMES = {
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:num_requests_running": "running",
    b"vllm:kv_cache_usage_perc": "kv_cache",
    b"vllm:gpu_cache_usage_perc": "kv_cache",
}


def read_gauges(text: bytes) -> dict[str, float] | None:
    """``{"waiting", "running", "kv_cache"}`` from ``/metrics`` text; None if no queue figure."""
    sums = {"waiting": 0.0, "running": 0.0, "kv_cache": 0.0}
    counts = {"waiting": 0, "running": 0, "kv_cache": 0}
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        name, _, rest = line.partition(b"{")
        if not rest:
            name, _, value = line.partition(b" ")
        else:
            value = rest.rpartition(b"}")[2]
        field = _NAMES.get(name.strip())
        if field is None:
            continue
        try:
            number = float(value.split()[0])
        except (IndexError, ValueError):
            continue
        sums[field] += number
        counts[field] += 1
    if not counts["waiting"]:
        return None
    if counts["kv_cache"]:
        sums["kv_cache"] /= counts["kv_cache"]
    return sums
