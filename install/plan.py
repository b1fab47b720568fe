"""The install plan of each supported platform, resolved offline from install/metadata.json.

Invariant: a plan is what `make venv` (or `make venv-gpu`) installs on that platform: the project
with `dev` and the `cpu` or `gpu` extra, under constraints.txt or constraints-gpu.txt, resolved by
uv for that platform's markers and wheel tags against stand-ins of exactly the files pip would
choose there. A stand-in is a file with the real name and metadata and no code: a resolver reads
nothing else, so it resolves as the real file does, offline and in milliseconds. PyPI and the
PyTorch CPU index are separate folders, so a plan also shows which indexes its platform needs.

tests/unit/test_install_plan.py checks the plans; run this file to print each plan's size:

    .venv/bin/python install/plan.py
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import uv
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "install" / "metadata.json"


@dataclass(frozen=True)
class Case:
    platform: str  # the snapshot's platform name
    uv_target: str  # uv's --python-platform
    extra: str  # cpu or gpu
    constraints: str
    indexes: tuple[str, ...]  # the indexes the Makefile gives pip there


CPU_INDEXES = ("pypi", "pytorch-cpu")
CASES = {
    "linux-x86_64-cpu": Case("linux-x86_64", "x86_64-manylinux_2_28", "cpu", "constraints.txt", CPU_INDEXES),
    "linux-aarch64-cpu": Case("linux-aarch64", "aarch64-manylinux_2_28", "cpu", "constraints.txt", CPU_INDEXES),
    "macos-arm64-cpu": Case("macos-arm64", "aarch64-apple-darwin", "cpu", "constraints.txt", ("pypi",)),
    "linux-x86_64-gpu": Case("linux-x86_64", "x86_64-manylinux_2_28", "gpu", "constraints-gpu.txt", ("pypi",)),
    "linux-aarch64-gpu": Case("linux-aarch64", "aarch64-manylinux_2_28", "gpu", "constraints-gpu.txt", ("pypi",)),
}


def snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def metadata_text(name: str, version: str, fields: dict, metadata_version: str) -> str:
    lines = [f"Metadata-Version: {metadata_version}", f"Name: {name}", f"Version: {version}"]
    if fields.get("requires_python"):
        lines.append(f"Requires-Python: {fields['requires_python']}")
    lines += [f"Provides-Extra: {extra}" for extra in fields.get("provides_extra", [])]
    lines += [f"Requires-Dist: {req}" for req in fields.get("requires_dist", [])]
    return "\n".join(lines) + "\n\n"


def write_stub(folder: Path, filename: str, fields: dict) -> Path:
    """Write a stand-in `filename` (a wheel, or a .tar.gz source release) with these metadata."""
    path = folder / filename
    if filename.endswith(".whl"):
        name, version, _, _ = parse_wheel_filename(filename)
        dist_info = "-".join(filename.split("-")[:2]) + ".dist-info"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{dist_info}/METADATA", metadata_text(name, str(version), fields, "2.1"))
            zf.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: aisrl\nRoot-Is-Purelib: true\n")
            zf.writestr(f"{dist_info}/RECORD", "")
        return path
    name, version = parse_sdist_filename(filename)
    # Metadata 2.2 with no Dynamic field: the requirements are final, no build is needed to read them.
    pkg_info = metadata_text(name, str(version), fields, "2.2").encode()
    top = filename.removesuffix(".tar.gz")
    with tarfile.open(path, "w:gz") as tf:
        for member, data in ((f"{top}/PKG-INFO", pkg_info), (f"{top}/pyproject.toml", b"")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def build_indexes(root: Path, files: list[dict]) -> Path:
    """root/<platform>/<index>/: stand-ins of the files pip chooses on that platform, by index."""
    for entry in files:
        for platform in entry["platforms"]:
            folder = root / platform / entry["index"]
            folder.mkdir(parents=True, exist_ok=True)
            write_stub(folder, entry["filename"], entry)
    return root


def resolve(indexes: Path, case: Case, cache: Path, index_names: tuple[str, ...] | None = None):
    """uv's resolution of the case's plan (a CompletedProcess; stdout is the lock on success)."""
    cmd = [uv.find_uv_bin(), "pip", "compile", str(ROOT / "pyproject.toml"), "--extra", "dev", "--extra", case.extra]
    cmd += ["-c", str(ROOT / case.constraints), "--python-version", "3.11", "--python-platform", case.uv_target]
    cmd += ["--no-index", "--offline", "--no-config", "--cache-dir", str(cache), "--no-header", "--no-annotate"]
    cmd += ["--quiet"]
    for name in case.indexes if index_names is None else index_names:
        cmd += ["--find-links", str(indexes / case.platform / name)]
    # macOS 14: the oldest release torch 2.13's wheels support (uv's default target is older).
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def pinned(lock: str) -> dict[str, str]:
    """name -> version of a resolved lock."""
    return dict(line.split("==", 1) for line in lock.splitlines() if "==" in line)


def download_bytes(files: list[dict], case: Case, lock: dict[str, str]) -> tuple[int, list[str]]:
    """Bytes pip downloads for the lock on the case's platform, and the files of unknown size."""
    total, unknown = 0, []
    for entry in files:
        filename = entry["filename"]
        parse = parse_wheel_filename if filename.endswith(".whl") else parse_sdist_filename
        name, version = parse(filename)[:2]
        if case.platform in entry["platforms"] and lock.get(canonicalize_name(name)) == str(version):
            if entry["size"] is None:
                unknown.append(filename)
            else:
                total += entry["size"]
    return total, unknown


def main() -> int:
    files = snapshot()["files"]
    with tempfile.TemporaryDirectory() as tmp:
        indexes = build_indexes(Path(tmp) / "indexes", files)
        print(f"{'plan':20} {'packages':>8} {'download':>10}  indexes")
        for name, case in CASES.items():
            result = resolve(indexes, case, Path(tmp) / "cache")
            if result.returncode != 0:
                print(f"{name}: does not resolve\n{result.stderr}")
                return 1
            lock = pinned(result.stdout)
            size, unknown = download_bytes(files, case, lock)
            note = f"  (+ size unknown: {', '.join(unknown)})" if unknown else ""
            print(f"{name:20} {len(lock):>8} {size / 2**20:>7.0f} MiB  {' + '.join(case.indexes)}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
