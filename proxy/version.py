"""The installed package's version (``python -m proxy --version``, ``GET /``)."""

from __future__ import annotations

from importlib import metadata

NAME = "vllm-wrapper"

try:
    VERSION = metadata.version(NAME)
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0+unknown"
