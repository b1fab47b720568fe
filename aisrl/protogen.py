"""Generates the Python protobuf/gRPC modules in `aisrl/v1/` from `proto/aisrl/v1/*.proto`.

Invariant: the committed modules are exactly what this produces with the pinned grpcio-tools;
`tests/unit/test_proto_generated.py` regenerates into a temporary folder and compares.
Run it with `make proto` (or `python -m aisrl.protogen`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "aisrl" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules under out_dir/aisrl/v1/ and returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # well-known types shipped with grpcio-tools
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return sorted((out_dir / "aisrl" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    written = generate(REPO_ROOT)
    for path in written:
        print(path.relative_to(REPO_ROOT))


if __name__ == "__main__":
    sys.exit(main())
