"""A simulated vLLM server: vLLM 0.32's wire format with made-up answers.

Standalone (imports nothing else from ``proxy``). Run it with
``python -m proxy.sim`` or embed it with :func:`create_sim_app`. Fault
switches and counters for tests live under ``/_sim/`` (see ``app.py``).
"""

from __future__ import annotations

from .app import SimApp, create_sim_app
from .options import SimOptions

__all__ = ["SimApp", "SimOptions", "create_sim_app"]
