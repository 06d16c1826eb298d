"""What the gateway says when it starts: one line of what runs, and the warnings.

The line names the listen address, the upstream (without credentials), the default
model, whether auth is on (and with how many keys) or OFF, the env file read, and
where the docs are. :func:`startup_warnings` lists the settings that are legal but
probably not what was meant.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from proxy.config import Settings
from proxy.version import VERSION

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_url(host: str, port: int) -> str:
    """The URL a person on this machine would open (``0.0.0.0`` shown as itself)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def startup_line(settings: Settings, url: str, *, upstream: str | None = None) -> str:
    """``vllm-wrapper X on URL -> upstream U; model M; auth A; env file F; docs D``."""
    count = len([k for k in settings.wrapper_api_key.split(",") if k.strip()])
    if count:
        auth = f"on ({count} key{'s' if count > 1 else ''})"
    elif settings.config_path:
        auth = f"as the [[keys]] of {settings.config_path} say (none: OFF)"
    else:
        auth = "OFF (VLLM_WRAPPER_API_KEY is empty)"
    if settings.config_path:
        auth += f"; config {settings.config_path}"
    docs = f"{url}/docs" if settings.docs else "off"
    line = (
        f"vllm-wrapper {VERSION} on {url} -> upstream {upstream or settings.public_base_url}; "
        f"model {settings.model}; auth {auth}; env file {settings.env_file or 'none'}; "
        f"docs {docs}"
    )
    if settings.playground:
        line += f"; chat in your browser at {url}/playground"
    return line


def base_url_warning(settings: Settings) -> str | None:
    """vLLM serves its OpenAI API under ``/v1``; a base URL without it 404s everything."""
    path = urlsplit(settings.base_url).path.rstrip("/")
    if path.endswith("/v1"):
        return None
    return (
        f"VLLM_BASE_URL={settings.public_base_url} does not end in /v1: vLLM serves its API "
        "under /v1, so every request would get 404 (use e.g. http://host:8000/v1)"
    )


def startup_warnings(settings: Settings, host: str) -> list[str]:
    """Settings that are legal but probably a mistake, for the listening ``host``."""
    warnings = []
    if not settings.wrapper_api_key and not is_loopback(host):
        warnings.append(
            f"auth is OFF and the gateway listens on {host}: anyone who can reach this port "
            "can use the upstream; set VLLM_WRAPPER_API_KEY"
        )
    return warnings
