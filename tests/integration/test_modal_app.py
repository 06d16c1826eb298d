"""``modal_app.py``, offline: no Modal account or network here, so ``modal deploy`` itself
is not run. What is checked: the module imports with the real ``modal`` package, the app
and its web function are declared as the README says, the knobs are read, the source the
image installs builds the package, and the ASGI app the function returns serves the
gateway in front of the simulator."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import CHAT_BODY, GATEWAY_ENV, KEY, MODEL, Sim
from tests.support.servers import ROOT, ServerProcess, free_port
from tests.support.streams import check_streams_incrementally

modal = pytest.importorskip("modal")
import modal_app  # noqa: E402


def _declared(function: object) -> dict:
    """What the decorators declared, as Modal will send it at deploy time.

    Modal keeps these in the closure of the function's loader (no public accessor); a
    Modal upgrade that moves them fails here loudly rather than skipping."""
    from modal._utils.async_utils import synchronizer

    load = synchronizer._translate_in(function)._load
    return dict(
        zip(load.__code__.co_freevars, [c.cell_contents for c in load.__closure__], strict=True)
    )


def test_app_and_function_are_declared() -> None:
    assert modal_app.app.name == "vllm-wrapper"
    fn = modal_app.fastapi_app
    assert isinstance(fn, modal.Function)
    declared = _declared(fn)
    assert [repr(s) for s in declared["secrets"]] == ["modal.Secret.from_name('vllm-secrets')"]
    assert "ASGI_APP" in str(declared["webhook_config"])
    defaults = modal_app.ModalOptions()
    assert declared["max_concurrent_inputs"] == defaults.max_inputs
    assert declared["target_concurrent_inputs_int"] == defaults.target_inputs
    assert declared["min_containers"] == defaults.min_containers == 0  # scale to zero
    assert declared["max_containers"] == defaults.max_containers
    assert declared["timeout"] == defaults.timeout
    assert declared["scaledown_window"] == defaults.scaledown_window


def _import_in_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import modal_app as m; o = m.OPTIONS; print(o.max_inputs, o.max_containers, o.timeout)"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VLLM_WRAPPER_MODAL_")}


def test_scaling_knobs_come_from_the_deploying_environment() -> None:
    env = {
        "VLLM_WRAPPER_MODAL_MAX_INPUTS": "64",
        "VLLM_WRAPPER_MODAL_TARGET_INPUTS": "48",
        "VLLM_WRAPPER_MODAL_MAX_CONTAINERS": "3",
        "VLLM_WRAPPER_MODAL_TIMEOUT": "900",
    }
    done = _import_in_subprocess(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["64", "3", "900"]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"VLLM_WRAPPER_MODAL_MAX_INPUTS": "many"}, "VLLM_WRAPPER_MODAL_MAX_INPUTS='many'"),
        ({"VLLM_WRAPPER_MODAL_TIMEOUT": "0"}, "VLLM_WRAPPER_MODAL_TIMEOUT='0'"),
        ({"VLLM_WRAPPER_MODAL_MIN_CONTAINERS": "20"}, "VLLM_WRAPPER_MODAL_MIN_CONTAINERS"),
        ({"VLLM_WRAPPER_MODAL_MIN_CONTAINERS": "-1"}, "VLLM_WRAPPER_MODAL_MIN_CONTAINERS='-1'"),
        ({"VLLM_WRAPPER_MODAL_MIN_CONTAINERS": "one"}, "VLLM_WRAPPER_MODAL_MIN_CONTAINERS='one'"),
        ({"VLLM_WRAPPER_MODAL_MAX_CONTAINERS": "0"}, "VLLM_WRAPPER_MODAL_MAX_CONTAINERS='0'"),
    ],
)
def test_a_bad_knob_stops_with_one_line(env: dict[str, str], names: str) -> None:
    done = _import_in_subprocess(env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: invalid setting " + names)


def test_the_image_source_builds_the_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in modal_app.SOURCE_FILES:
        shutil.copy(ROOT / name, src / name)
    for name in modal_app.SOURCE_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("vllm_wrapper-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "proxy").rglob("*.py")}
    assert shipped <= set(names)


def test_the_function_serves_the_gateway(sim: Sim) -> None:
    """The app ``fastapi_app`` returns (called as Modal calls it), under uvicorn, with the
    settings the secret would hold."""
    port = free_port()
    code = (
        "import modal_app, uvicorn; "
        f"uvicorn.run(modal_app.fastapi_app.local(), host='127.0.0.1', port={port})"
    )
    env = {
        **GATEWAY_ENV,
        "VLLM_BASE_URL": sim.base_url,
        "VLLM_WRAPPER_API_KEY": KEY,
        "VLLM_WRAPPER_ENV_FILE": "",
    }
    with ServerProcess([sys.executable, "-c", code], port=port, env=env, name="modal") as server:
        sim.reset()
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["status"] == "healthy" and health["model"] == MODEL
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        check_streams_incrementally(server.url + "/v1/chat/completions", sim, CHAT_BODY, auth)
    assert "opened outside the lifespan" not in server.log_text()
