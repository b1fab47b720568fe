"""Runs every `bench_*.py` module of this package (or those named: `python -m bench ais diagnostics`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    """Names of the benchmark modules, without the `bench_` prefix, sorted."""
    here = str(Path(__file__).resolve().parent)
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def main(argv: list[str]) -> int:
    names = available()
    chosen = argv or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"== bench_{name}", flush=True)
        sys.argv = [f"bench_{name}"]  # each benchmark parses sys.argv: run it on its own defaults
        importlib.import_module(f"{__package__ or 'bench'}.bench_{name}").main()
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
