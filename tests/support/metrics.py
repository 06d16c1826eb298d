"""Reading a gateway's ``/metrics`` in tests: scrape, parse with prometheus-client's parser."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One parsed exposition: every sample, and the declared metric families."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: Samples = {}
        self.families: dict[str, str] = {}  # name -> type
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value, 0 when absent."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def series(self, prefix: str = "vllm_wrapper_") -> set[tuple[str, frozenset]]:
        return {k for k in self.samples if k[0].startswith(prefix)}

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(ls)[label] for n, ls in self.samples if n == name and label in dict(ls)}

    def declares(self, name: str) -> bool:
        """Whether ``name`` is a family or one of its samples' names (``_total``, ``_bucket``)."""
        if any(n == name for n, _ in self.samples):
            return True
        for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
            if name.endswith(suffix) and name.removesuffix(suffix) in self.families:
                return True
        return name in self.families


def scrape(base_url: str, headers: Mapping[str, str] | None = None) -> Scrape:
    r = httpx.get(base_url + "/metrics", headers=dict(headers or {}), timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(r.text)


def wait_scrape(
    base_url: str,
    ready: Callable[[Scrape], bool],
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Scrape:
    """Scrape until ``ready`` holds (a request's figures land when its handler returns)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(base_url, headers)
        if ready(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)
