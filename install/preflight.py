#!/usr/bin/env python3
"""Before `make venv` runs pip: check, in seconds, that every package index pip will use answers.

Invariant: pip is started only when the indexes it needs answer; otherwise this exits 1 with one
message that names the variable to set. (pip itself retries an unreachable index for minutes.)
stdout carries the extra pip arguments (`--extra-index-url URL` for the PyTorch CPU index, or
nothing); messages go to stderr.

The PyTorch index is needed only for the pins it alone serves (torch==2.13.0+cpu on Linux). When it
does not answer but pip can already satisfy the `torch` constraint from a local wheel folder
(`find-links` in pip's configuration, as on our CI machines), the install goes on without it.

Standard library only: it runs in the new virtual environment before anything is installed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

PYPI = "https://pypi.org/simple"


def probe(index_url: str, project: str, timeout_s: float, *, must_serve: bool = True) -> str | None:
    """None when `index_url` serves `project`'s page (or, with must_serve=False, answers at all:
    a private extra index need not serve it), else the reason.

    A project page, not the index root: the root of a PyPI mirror is megabytes. A 404 counts as
    unreachable when the project must be there: an intercepting proxy answers 404 for any host."""
    url = index_url.rstrip("/") + f"/{project}/"
    parsed = urlparse(url)
    if parsed.scheme == "file":
        folder = Path(parsed.path) if must_serve else Path(parsed.path).parent
        return None if folder.is_dir() else f"{folder} is not a folder"
    if parsed.scheme not in ("http", "https"):
        return f"unsupported URL scheme {parsed.scheme!r}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError as e:
        # 401/403: the index is there and wants credentials, which pip may have (netrc, keyring).
        answers = e.code in (401, 403) or (e.code < 500 and not must_serve)
        return None if answers else f"HTTP {e.code} for {url}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def pip_config(pip: str) -> dict[str, str]:
    """pip's effective settings (`pip config list`: files and PIP_* variables), key -> value."""
    out = subprocess.run([pip, "config", "list"], capture_output=True, text=True, check=False).stdout
    settings = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip()] = " ".join(shlex.split(value))
    return settings


def configured_indexes(settings: dict[str, str]) -> tuple[str, list[str]]:
    """(index-url, extra-index-urls) pip uses; the environment wins over files, as in pip."""

    def pick(name: str) -> str | None:
        for scope in (":env:", "install", "global"):
            if f"{scope}.{name}" in settings:
                return settings[f"{scope}.{name}"]
        return None

    index = pick("index-url") or PYPI
    no_index = (pick("no-index") or "").lower() in ("1", "true", "yes", "on")
    extras = (pick("extra-index-url") or "").split()
    return ("" if no_index else index), extras


def torch_available_locally(pip: str, constraints: str) -> bool:
    """Whether pip satisfies the `torch` constraint from local wheel folders alone (no index)."""
    cmd = [pip, "install", "--dry-run", "--ignore-installed", "--no-deps", "--no-index", "--quiet"]
    cmd += ["-c", constraints, "torch"]
    return subprocess.run(cmd, capture_output=True, text=True, check=False).returncode == 0


def fail(message: str) -> int:
    print(f"make venv: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pip", required=True, help="the virtual environment's pip")
    parser.add_argument("--constraints", required=True, help="the constraints file pip will get")
    parser.add_argument("--torch-index", default="", help="PyTorch index to add (TORCH_INDEX_URL); '' for none")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each index")
    args = parser.parse_args(argv)

    index, extras = configured_indexes(pip_config(args.pip))
    for url, role in [(index, "PIP_INDEX_URL"), *((u, "PIP_EXTRA_INDEX_URL") for u in extras)]:
        if url and (reason := probe(url, "pip", args.timeout, must_serve=role == "PIP_INDEX_URL")):
            return fail(
                f"the package index {url} does not answer ({reason}). Set {role} to a reachable mirror "
                "(or HTTPS_PROXY=http://host:port behind a proxy) and run make again."
            )

    if not args.torch_index:
        return 0
    reason = probe(args.torch_index, "torch", args.timeout)
    if reason is None:
        print(f"--extra-index-url {args.torch_index}")
        return 0
    if torch_available_locally(args.pip, args.constraints):
        print(
            f"make venv: the PyTorch index {args.torch_index} does not answer ({reason}); "
            "torch comes from a local wheel folder in pip's configuration instead.",
            file=sys.stderr,
        )
        return 0
    return fail(
        f"the PyTorch CPU index {args.torch_index} does not answer ({reason}), and {args.constraints} pins a "
        "torch build that only it serves. Set TORCH_INDEX_URL to a reachable mirror of it "
        "(or HTTPS_PROXY=http://host:port behind a proxy) and run make again."
    )


if __name__ == "__main__":
    sys.exit(main())
