"""Deploy the gateway on Modal: ``modal deploy modal_app.py``.

The image installs this package from the local source; the gateway's settings
(``VLLM_BASE_URL``, ``VLLM_API_KEY``, ``VLLM_WRAPPER_API_KEY``, ...) come from the
Modal secret ``vllm-secrets``. Modal runs the app's lifespan, so the upstream
connection pool is opened once per container and closed when it stops.

Scaling knobs are read from the environment *where you run* ``modal deploy``
(not from the secret), e.g. ``VLLM_WRAPPER_MODAL_MAX_INPUTS=200 modal deploy
modal_app.py``; see the README for the list. The function is named
``fastapi_app`` so the URL (``https://<workspace>--vllm-wrapper-fastapi-app.modal.run``)
stays what earlier deployments of the wrapper used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import modal

if TYPE_CHECKING:
    from starlette.applications import Starlette

APP_NAME = "vllm-wrapper"
SECRET_NAME = "vllm-secrets"
ROOT = Path(__file__).resolve().parent
SRC = "/opt/vllm-wrapper"
# What the image needs to install the package (pyproject names README.md as its readme).
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")
SOURCE_DIRS = ("proxy",)


@dataclass(frozen=True)
class ModalOptions:
    """How the gateway scales on Modal. Defaults suit a streaming gateway: it mostly waits
    on the upstream, so one small container relays many streams at once."""

    max_inputs: int = 500  # concurrent requests (streams) per container
    target_inputs: int = 400  # the autoscaler adds containers above this many per container
    # Scale to zero when idle (what Modal users expect; nothing is billed). 1 keeps a container
    # warm: no gateway cold start (a few seconds) in front of vLLM's own, billed around the clock.
    min_containers: int = 0
    max_containers: int = 10
    timeout: int = 3600  # seconds one request may last (a long generation)
    scaledown_window: int = 300  # seconds an idle container waits before it stops
    cpu: float = 1.0
    memory: int = 1024  # MiB

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ[str] = os.environ) -> ModalOptions:
        values: dict[str, int | float] = {}
        for name, default in cls().__dict__.items():
            var = f"VLLM_WRAPPER_MODAL_{name.upper()}"
            raw = environ.get(var)
            if raw is None:
                continue
            kind = type(default)
            try:
                value = kind(raw.strip())
            except ValueError:
                value = -1  # reported below, like any other bad value
            # Only the warm pool may be empty (0: scale to zero); the rest must be positive.
            if value < 0 or (value == 0 and name != "min_containers"):
                noun = "an integer" if kind is int else "a number"
                bound = ">= 0" if name == "min_containers" else "> 0"
                raise SystemExit(f"error: invalid setting {var}={raw!r}: expected {noun} {bound}")
            values[name] = value
        options = cls(**values)  # type: ignore[arg-type]
        if options.min_containers > options.max_containers:
            raise SystemExit(
                "error: invalid setting VLLM_WRAPPER_MODAL_MIN_CONTAINERS: "
                f"{options.min_containers} is above VLLM_WRAPPER_MODAL_MAX_CONTAINERS"
            )
        if options.target_inputs > options.max_inputs:
            raise SystemExit(
                "error: invalid setting VLLM_WRAPPER_MODAL_TARGET_INPUTS: "
                f"{options.target_inputs} is above VLLM_WRAPPER_MODAL_MAX_INPUTS"
            )
        return options


OPTIONS = ModalOptions.from_env()

# Dependencies first: that layer is rebuilt only when pyproject.toml changes.
image = modal.Image.debian_slim(python_version="3.12").pip_install_from_pyproject(
    str(ROOT / "pyproject.toml")
)
for name in SOURCE_FILES:
    image = image.add_local_file(ROOT / name, f"{SRC}/{name}", copy=True)
for name in SOURCE_DIRS:
    image = image.add_local_dir(ROOT / name, f"{SRC}/{name}", copy=True, ignore=["**/__pycache__"])
image = image.run_commands(f"pip install --no-deps {SRC}")

app = modal.App(APP_NAME, image=image)


def build_app() -> Starlette:
    """The ASGI app each container serves: the gateway, with settings from the environment
    (which the secret fills in)."""
    import proxy

    return proxy.create_app()


@app.function(
    secrets=[modal.Secret.from_name(SECRET_NAME)],
    min_containers=OPTIONS.min_containers,
    max_containers=OPTIONS.max_containers,
    timeout=OPTIONS.timeout,
    scaledown_window=OPTIONS.scaledown_window,
    cpu=OPTIONS.cpu,
    memory=OPTIONS.memory,
)
@modal.concurrent(max_inputs=OPTIONS.max_inputs, target_inputs=OPTIONS.target_inputs)
@modal.asgi_app()
def fastapi_app() -> Starlette:
    return build_app()
