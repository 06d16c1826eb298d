"""The three servers of the benchmark, and what /proc says about their processes.

Each server is a process group started on a free loopback port; ``cpu_seconds``
and ``rss_bytes`` sum over the group leader and all its descendants (uvicorn's
worker processes, nginx's worker).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from scripts.vllm_cpu import descendants

ROOT = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    return [pid, *descendants(pid)]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (whole processes, all threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # stat fields 14 and 15
    return total / _TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except OSError:
            continue
    return total


class RssPeak:
    """Samples the summed RSS of a process tree every ``interval`` s in a thread."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = rss_bytes(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pids))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pids))


class Server:
    """A process group serving HTTP on 127.0.0.1:``port``."""

    def __init__(
        self,
        name: str,
        args: list[str],
        port: int,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ):
        self.name = name
        self.cwd = cwd
        self.args = args
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        assert self.proc is not None
        return tree(self.proc.pid)

    def start(self, ready_path: str, workers: int = 1) -> Server:
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                ok = httpx.get(self.url + ready_path, timeout=1).status_code < 500
                # uvicorn --workers: wait until every worker has started, too
                if ok and (workers == 1 or len(self.pids()) > workers):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready: {Path(self.log.name).read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def sim(tokens: int, model: str = "tiny-llama") -> Server:
    port = free_port()
    args = [sys.executable, "-m", "proxy.sim", "--port", str(port), "--tokens", str(tokens)]
    return Server("sim", [*args, "--model", model, "--log-level", "warning"], port)


def gateway(
    upstream: str, workers: int, env: dict[str, str] | None = None, src: Path = ROOT
) -> Server:
    """The gateway from the source tree ``src`` (default: this one)."""
    port = free_port()
    env = {
        "VLLM_BASE_URL": upstream + "/v1",
        "VLLM_WRAPPER_API_KEY": "",
        "VLLM_WRAPPER_ACCESS_LOG": "false",  # as nginx's access_log off
        "VLLM_WRAPPER_LOG_LEVEL": "warning",
        **(env or {}),
    }
    args = [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--env-file", "", "--workers", str(workers)]
    return Server(f"gateway-w{workers}", args, port, env, cwd=src)


NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream sim {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def nginx(upstream_port: int) -> Server:
    """Debian's nginx as a plain reverse proxy, 1 worker, in the foreground, unprivileged."""
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = tempfile.mkdtemp(prefix="bench-nginx-")
    os.chmod(prefix, 0o777)
    port = free_port()
    conf = Path(prefix) / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, upstream_port=upstream_port))
    args = [exe, "-c", str(conf), "-p", prefix, "-e", f"{prefix}/error.log", "-g", "daemon off;"]
    if os.geteuid() == 0:
        args = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *args]
    return Server("nginx", args, port)


LITELLM_CONF = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: hosted_vllm/{model}
      api_base: {upstream}/v1
      api_key: none
general_settings:
  forward_client_headers_to_llm_api: true
litellm_settings:
  telemetry: false
"""


def litellm(exe: str, upstream: str, model: str = "tiny-llama") -> Server:
    """LiteLLM's proxy (``litellm``, from its own virtualenv: not a dependency of this
    project), 1 worker, no master key and no database (no auth, as the gateway's **off**),
    forwarding ``x-`` headers so the upstream sees ``x-sim-tokens``/``x-sim-delay-ms``."""
    prefix = tempfile.mkdtemp(prefix="bench-litellm-")
    conf = Path(prefix) / "config.yaml"
    conf.write_text(LITELLM_CONF.format(model=model, upstream=upstream))
    port = free_port()
    env = {
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download at start-up
        "LITELLM_LOG": "ERROR",
    }
    args = [exe, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)]
    return Server("litellm", [*args, "--num_workers", "1"], port, env, cwd=Path(prefix))


def require_tools() -> None:
    """Exit with one line naming what to install when nginx or wrk is missing."""
    missing = [
        t
        for t in ("nginx", "wrk")
        if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()
    ]
    if missing:
        sys.exit(f"bench needs {' and '.join(missing)}: apt-get install -y nginx wrk")
