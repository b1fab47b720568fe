"""`aisrl diagnostics` as a user runs it: a real process, free ports, an embedded Redis, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

AISRL = str(Path(sys.executable).parent / "aisrl")


def test_serves_on_free_ports_and_stops_cleanly_on_sigterm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISRL_")}
    proc = subprocess.Popen(
        [AISRL, "diagnostics", "--http-port", "0", "--grpc-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        http_port = grpc_port = None
        while (http_port is None or grpc_port is None) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"REST http://[\d.]+:(\d+)", line):
                http_port = int(m.group(1))
            if m := re.search(r"gRPC [\d.]+:(\d+)", line):
                grpc_port = int(m.group(1))
        assert http_port and grpc_port, "".join(lines)
        assert any("embedded Redis" in line for line in lines)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the embedded redis-server should be a child process"
        reply = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10)
        assert reply.status_code == 200 and reply.json()["grpc_port"] == grpc_port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # children end with the service (multiprocessing's helpers see their pipe close a moment later)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert all(child.status() == psutil.STATUS_ZOMBIE for child in alive), alive
    finally:
        if proc.poll() is None:
            proc.kill()
