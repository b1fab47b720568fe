"""Stand-in distributions for the install tests: real file names and metadata, no code.

A resolver reads only a distribution's name, version, tags and metadata, so a wheel holding just
its METADATA (or a source release holding just its PKG-INFO) resolves exactly as the real file
does, offline and in milliseconds.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from packaging.utils import parse_sdist_filename, parse_wheel_filename


def metadata_text(name: str, version: str, fields: dict, metadata_version: str) -> str:
    lines = [f"Metadata-Version: {metadata_version}", f"Name: {name}", f"Version: {version}"]
    if fields.get("requires_python"):
        lines.append(f"Requires-Python: {fields['requires_python']}")
    lines += [f"Provides-Extra: {extra}" for extra in fields.get("provides_extra", [])]
    lines += [f"Requires-Dist: {req}" for req in fields.get("requires_dist", [])]
    return "\n".join(lines) + "\n\n"


def write_stub(folder: Path, filename: str, fields: dict) -> Path:
    """Write `filename` (a wheel or a .tar.gz source release) into folder, with these metadata."""
    path = folder / filename
    if filename.endswith(".whl"):
        name, version, _, _ = parse_wheel_filename(filename)
        dist_info = f"{filename.split('-')[0]}-{filename.split('-')[1]}.dist-info"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{dist_info}/METADATA", metadata_text(name, str(version), fields, "2.1"))
            zf.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: aisrl-tests\nRoot-Is-Purelib: true\n")
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
