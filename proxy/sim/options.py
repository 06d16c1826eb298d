"""Settings of the simulated vLLM server: one frozen object, built once, passed down."""

from __future__ import annotations

from dataclasses import dataclass

VLLM_VERSION = "0.32.0"


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Everything that shapes the simulator's behaviour.

    ``models`` are the served model names; the first one is the default when a
    request names none and the ``model_name`` label of ``/metrics``.
    ``tokens`` forces every generation to exactly ``min(tokens, max_tokens)``
    tokens (benchmarks); ``token_delay`` is the pause between two tokens and
    ``first_token_delay`` the pause before the first one (time to first token).
    ``embeddings`` serves ``/v1/embeddings`` too; a real vLLM serving a generative
    model has no such route (404 ``{"detail":"Not Found"}``), as with ``False``.
    ``max_running`` caps the generations running at once; the rest wait in a queue,
    as in vLLM's scheduler, and ``/metrics`` reports them (``num_requests_waiting``).
    """

    models: tuple[str, ...] = ("tiny-llama",)
    max_model_len: int = 4096
    tokens: int | None = None
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    access_log: bool = False
    embeddings: bool = True
    max_running: int | None = None

    def __post_init__(self) -> None:
        if not self.models or any(not m for m in self.models):
            raise ValueError("at least one non-empty model name is required")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError("tokens must be at least 1")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError("max_running must be at least 1")
        if self.token_delay < 0 or self.first_token_delay < 0:
            raise ValueError("delays must be non-negative")
