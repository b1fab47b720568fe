"""Helpers of the `aisrl up` integration tests: start the real command, watch its process tree, read its logs.

`TreeWatcher` records every descendant of a process while it runs, so a test can assert afterwards
that none of them (children, grandchildren such as vLLM's engine core or redis-server) is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import yaml

AISRL = str(Path(sys.executable).parent / "aisrl")


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def start_up(config: Path, run_id: str) -> subprocess.Popen:
    """`aisrl up --config config --run-id run_id` in its own session, without the caller's AISRL_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISRL_")}
    return subprocess.Popen([AISRL, "up", "--config", str(config), "--run-id", run_id], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def output(proc: subprocess.Popen) -> str:
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


def wait_up(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, str]:
    """Waits for `aisrl up` to exit; past timeout_s kills its whole session. Returns (exit status or None, output)."""
    try:
        rc: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return rc, output(proc)


def log_tails(run_dir: Path, lines: int = 25) -> str:
    """The last lines of every process log of a run (for assertion messages)."""
    parts = []
    for log in sorted((run_dir / "logs").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs in {run_dir / 'logs'})"


class TreeWatcher:
    """Records every descendant of a process while it runs (so the check covers short-lived ones too)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for proc in psutil.Process(self.pid).children(recursive=True):
                    self.seen.setdefault(proc.pid, proc)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(0.2)

    def survivors(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=5)
        alive = []
        for proc in self.seen.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        return alive
