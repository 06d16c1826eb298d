"""The code blocks of the user's guide (tests/data/seed-guide.zh.md, a verbatim copy)."""

from __future__ import annotations

import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "data" / "seed-guide.zh.md"
GUIDE_HOST = "http://localhost:8001"
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [code for kind, code in _BLOCK.findall(GUIDE.read_text("utf-8")) if kind == lang]


def curl_examples() -> list[str]:
    return [code for code in blocks("bash") if code.lstrip().startswith("curl ")]


def python_examples() -> list[str]:
    return blocks("python")


def at(code: str, base_url: str) -> str:
    """The example pointed at ``base_url`` instead of the guide's host; nothing else changes."""
    assert GUIDE_HOST in code
    return code.replace(GUIDE_HOST, base_url)
