#!/usr/bin/env python3
"""Container health check for the `aisrl` image: GET /healthz (or the path given) of the service in this container.

Invariant: the port probed is the port the service binds. The service is the `aisrl <command>` that
PID 1 runs (tini -- aisrl <command> ...); its HTTP port is `--http-port` on that command line, else
the service's environment variable (AISRL_<SERVICE>_HTTP_PORT), else the service's default. The
defaults and prefixes below are checked against the settings classes by tests/integration/test_deploy.py.
Standard library only, so the check costs a few milliseconds and works in every image.

Usage: aisrl-healthcheck [PATH]   (PATH: /healthz by default, /readyz for readiness). Exit 0 on HTTP 200.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

# service -> (environment prefix, default HTTP port); must equal the settings classes (tested).
SERVICES: dict[str, tuple[str, int]] = {
    "diagnostics": ("AISRL_DIAG_", 8080),
    "learner": ("AISRL_LEARNER_", 8070),
    "rollout": ("AISRL_ROLLOUT_", 8090),
}
TIMEOUT_S = 4.0


def service_and_port(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, int]:
    """The aisrl service a command line runs and the HTTP port it binds; ValueError if it runs none."""
    args = list(argv)
    start = next((i for i, a in enumerate(args) if os.path.basename(a) == "aisrl"), None)
    if start is None or start + 1 >= len(args) or args[start + 1] not in SERVICES:
        raise ValueError(f"not an aisrl service command line: {' '.join(args)!r}")
    service = args[start + 1]
    prefix, port = SERVICES[service]
    value: str | None = environ.get(f"{prefix}HTTP_PORT")
    rest = args[start + 2 :]
    for i, arg in enumerate(rest):
        if arg == "--http-port" and i + 1 < len(rest):
            value = rest[i + 1]
        elif arg.startswith("--http-port="):
            value = arg.split("=", 1)[1]
    if value is not None:
        port = int(value)
    if port == 0:
        raise ValueError(f"{service} binds a random port (http_port=0); health checks need a fixed one")
    return service, port


def probe(url: str, timeout_s: float = TIMEOUT_S) -> int:
    """The HTTP status url answers with (an error status too); OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:  # 4xx/5xx: an answer, not a failure to connect
        return exc.code


def main(argv: Sequence[str] | None = None, cmdline_path: str = "/proc/1/cmdline") -> int:
    path = (list(argv) if argv is not None else sys.argv[1:])[:1] or ["/healthz"]
    try:
        with open(cmdline_path, "rb") as f:
            cmdline = [a.decode() for a in f.read().split(b"\0") if a]
        service, port = service_and_port(cmdline, os.environ)
        url = f"http://127.0.0.1:{port}{path[0]}"
        status = probe(url)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {service} answered {status} at {url}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
