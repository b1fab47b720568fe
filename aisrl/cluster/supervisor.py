"""Starts the cluster's processes, waits until each is ready, watches them, and stops them all.

Invariant: no child outlives the supervisor, nor any of their descendants. Every child runs in its
own session (process group), so a Ctrl-C at the terminal reaches the supervisor alone and the
supervisor decides the order of the stop: reverse start order, SIGTERM to the child (which stops its
own subprocesses), `stop_grace_s` to exit, then SIGKILL to its whole group. Descendants are
snapshotted with psutil before the signal, so a grandchild that left the group or outlived its
parent is found and stopped as well (SIGTERM, a short wait, SIGKILL). A child that exits on its own is an
error naming it, its exit status and its last log lines, except the topology's main process (the
learner) exiting with status 0, which is how the run finishes, even while others are still starting
(a resumed run whose learner had already reached its steps). Each child's stdout and stderr go to
`<run_dir>/logs/<name>.log`.

With a restart policy (`RestartSettings`), a child that exits unexpectedly is restarted with the
same command after a backoff, and the run fails only on a crash loop (more than `max_restarts`
crashes within `window_s`), with the log excerpt of the last crash. Each child gets SIGTERM when
the supervisor dies, even by SIGKILL (`aisrl.procs.die_with_parent`), so nothing keeps running
without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import httpx
import psutil

from aisrl.cluster.restarts import CrashHistory, RestartSettings
from aisrl.cluster.topology import ProcessSpec, Topology, log_path
from aisrl.logs import log_fields
from aisrl.procs import die_with_parent

log = logging.getLogger("aisrl.cluster")

TAIL_LINES = 25


class ClusterError(RuntimeError):
    """A child failed to start or died; the message names it and says why."""

    def __init__(self, name: str, reason: str, log_tail: str = "") -> None:
        self.name = name
        self.reason = reason
        self.log_tail = log_tail
        super().__init__(f"{name}: {reason}" + (f"\n--- last lines of its log ---\n{log_tail}" if log_tail else ""))


def exit_reason(returncode: int) -> str:
    """'exited with status 3' or 'killed by SIGKILL' (Popen gives -N for signal N)."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = 64 << 10) -> str:
    """The last lines of a log file (empty when there is none)."""
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - max_bytes))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def last_error(text: str) -> str | None:
    """The last failure in text: the exception line of a Python traceback (`ValueError: ...`) or the CLI's
    one-line `error: ...` (aisrl.cli_errors), whichever comes last; None when there is neither."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return lines[i].strip()
        if lines[i].startswith("Traceback (most recent call last)"):
            for line in lines[i + 1 :]:
                if line and not line.startswith((" ", "\t")):
                    return line.strip()
    return None


def aisrl_executable() -> list[str]:
    """How to run `aisrl`: the console script beside this interpreter, else through the interpreter."""
    script = Path(sys.executable).parent / "aisrl"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from aisrl.cli import main; main()"]


def command_line(argv: Sequence[str]) -> list[str]:
    """argv with a leading `aisrl` resolved to this installation's command."""
    if argv and argv[0] == "aisrl":
        return [*aisrl_executable(), *argv[1:]]
    return list(argv)


@dataclass
class Child:
    """One started child: its spec, process, log file and start time."""

    spec: ProcessSpec
    process: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]
    started: float = field(default_factory=time.monotonic)
    ready_s: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self, reason: str) -> ClusterError:
        self.log_file.flush()
        text = tail(self.log_path, lines=400)
        cause = last_error(text)
        shown = "\n".join(text.splitlines()[-TAIL_LINES:])
        return ClusterError(self.spec.name, f"{reason}: {cause}" if cause else reason, shown)


def spawn(spec: ProcessSpec, run_dir: Path, base_env: Mapping[str, str] | None = None) -> Child:
    """Starts spec in its own session with its output appended to its log file."""
    path = log_path(run_dir, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = path.open("ab")
    log_file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} start {' '.join(spec.argv)}\n".encode())
    log_file.flush()
    # Plain Python tracebacks in log files (typer's boxed ones wrap at 80 columns and hide the last line).
    env = {**(os.environ if base_env is None else base_env), **spec.env, "PYTHONUNBUFFERED": "1",
           "TYPER_STANDARD_TRACEBACK": "1"}  # fmt: skip
    try:
        process = subprocess.Popen(
            command_line(spec.argv), env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent(),
        )  # fmt: skip
    except OSError as exc:
        log_file.close()
        raise ClusterError(spec.name, f"could not start {spec.argv[0]!r}: {exc}") from None
    log.info("started", extra=log_fields(name=spec.name, pid=process.pid, log=str(path)))
    return Child(spec, process, path, log_file)


def process_tree(pid: int) -> list[psutil.Process]:
    """pid's descendants (not pid itself) that exist now."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def group_members(pgid: int) -> list[psutil.Process]:
    """Processes whose process group is pgid."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return found


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass(frozen=True)
class StopResult:
    name: str
    returncode: int | None
    seconds: float
    killed: bool  # needed SIGKILL (itself or a descendant)


def stop_children(children: Sequence[Child], grace_s: float, hurry: threading.Event | None = None) -> list[StopResult]:
    """Stops children together and reaps every descendant; see the module invariant.

    SIGTERM goes to each child only (a service stops its own subprocesses in order, e.g. vLLM's engine
    process); a child still running after grace_s gets SIGKILL with its whole group. Descendants left
    after their parent exited get SIGTERM, a short wait, then SIGKILL. `hurry` set (a second Ctrl-C)
    cuts the grace period short.
    """
    started = time.monotonic()
    snapshot = {c.spec.name: process_tree(c.pid) for c in children}
    for child in children:
        if child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
    deadline = started + grace_s
    while time.monotonic() < deadline and not (hurry and hurry.is_set()):
        if all(c.process.poll() is not None for c in children):
            break
        time.sleep(0.05)
    results = []
    for child in children:
        killed = False
        if child.process.poll() is None:
            log.warning("grace period over: killing", extra=log_fields(name=child.spec.name, pid=child.pid))
            _signal_group(child.pid, signal.SIGKILL)
            killed = True
        try:
            child.process.wait(timeout=10)  # reaped by Popen first, so its exit status is the real one
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
            log.error("child did not exit after SIGKILL", extra=log_fields(name=child.spec.name, pid=child.pid))
        killed |= _reap_leftovers(child, snapshot[child.spec.name], min(5.0, grace_s), hurry)
        child.log_file.close()
        results.append(StopResult(child.spec.name, child.process.returncode, time.monotonic() - started, killed))
    return results


def _reap_leftovers(
    child: Child, snapshot: Sequence[psutil.Process], grace_s: float, hurry: threading.Event | None
) -> bool:
    """Stops descendants that outlived the child (snapshot or same group); True when one needed SIGKILL."""
    seen: dict[int, psutil.Process] = {}
    for proc in [*snapshot, *group_members(child.pid)]:
        if proc.pid != child.pid and _running(proc):
            seen.setdefault(proc.pid, proc)
    leftovers = list(seen.values())
    if not leftovers:
        return False
    log.warning("stopping leftover descendants", extra=log_fields(name=child.spec.name,
                pids=[p.pid for p in leftovers]))  # fmt: skip
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=0 if hurry and hurry.is_set() else grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return bool(alive)


def _running(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def run_job(
    spec: ProcessSpec, run_dir: Path, stop: threading.Event, grace_s: float, base_env: Mapping[str, str] | None = None
) -> int | None:
    """Runs a one-shot child to completion; its exit status, or None when stopped first (the child is stopped too)."""
    child = spawn(spec, run_dir, base_env)
    try:
        while child.process.poll() is None:
            if stop.wait(0.2):
                stop_children([child], grace_s)
                return None
        return child.process.returncode
    finally:
        if child.process.poll() is None:  # an exception on the way: never leave it running
            stop_children([child], grace_s)
        child.log_file.close()


class Keeper(Protocol):
    """A process outside the topology that the supervisor heals too (see up.RedisKeeper)."""

    name: str
    history: CrashHistory

    def check(self, now: float) -> None:
        """Restarts the process if it died (after its backoff); ClusterError on a crash loop."""


@dataclass(frozen=True)
class Outcome:
    """How the watch ended: `finished` (the main process exited 0) or `interrupted` (a stop was requested)."""

    reason: str
    seconds: float


class Supervisor:
    """Runs a topology: `start()`, `watch()`, and always `stop()` (also as a context manager)."""

    def __init__(
        self,
        topology: Topology,
        run_dir: Path,
        *,
        health_timeout_s: float = 600.0,
        stop_grace_s: float = 30.0,
        stop_event: threading.Event | None = None,
        hurry_event: threading.Event | None = None,
        base_env: Mapping[str, str] | None = None,
        on_state: Callable[[str, str], None] | None = None,
        restart: RestartSettings | None = None,
        keepers: Sequence[Keeper] = (),
    ) -> None:
        self.topology = topology
        self.run_dir = Path(run_dir)
        self.health_timeout_s = health_timeout_s
        self.stop_grace_s = stop_grace_s
        self.stop_event = stop_event or threading.Event()
        self.hurry_event = hurry_event or threading.Event()
        self.base_env = base_env
        self.on_state = on_state or (lambda name, state: None)
        self.children: dict[str, Child] = {}
        self.timings: dict[str, float] = {}
        self.stopped: list[StopResult] = []
        self.restart = restart  # None: any unexpected exit fails the run
        self.history: dict[str, CrashHistory] = {}
        self.keepers = list(keepers)  # other processes healed in the watch loop (the embedded Redis)
        self._due: dict[str, float] = {}  # crashed children: when to start them again (monotonic)

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        """Starts every wave and waits for its readiness; raises ClusterError (children left for stop())."""
        t0 = time.monotonic()
        for wave in self.topology.start_waves():
            for spec in wave:
                if self.stop_event.is_set():
                    return
                self.children[spec.name] = spawn(spec, self.run_dir, self.base_env)
                self.on_state(spec.name, "starting")
            self._wait_ready([self.children[s.name] for s in wave])
            if self._main_finished():
                break  # nothing left to do: later waves are not started
        self.timings["start_s"] = time.monotonic() - t0

    def _wait_ready(self, children: Sequence[Child]) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        pending = list(children)
        last_answer: dict[str, str] = {}
        with httpx.Client(timeout=2.0) as http:
            while pending and not self.stop_event.is_set():
                if self._main_finished():
                    return  # e.g. a resumed run already at its target steps: watch() reports it finished
                for child in list(pending):
                    rc = child.process.poll()
                    if rc is not None:
                        raise child.failure(f"{exit_reason(rc)} while starting")
                    try:
                        answer = http.get(child.spec.ready_url)
                        last_answer[child.spec.name] = f"HTTP {answer.status_code}: {answer.text[:300]}"
                        ok = answer.status_code == 200
                    except httpx.HTTPError as exc:
                        last_answer[child.spec.name] = f"{type(exc).__name__}"
                        ok = False
                    if ok:
                        child.ready_s = time.monotonic() - child.started
                        self.timings[f"ready_{child.spec.name}_s"] = child.ready_s
                        pending.remove(child)
                        self.on_state(child.spec.name, "ready")
                        log.info("ready", extra=log_fields(name=child.spec.name, seconds=round(child.ready_s, 1)))
                if pending and time.monotonic() > deadline:
                    child = pending[0]
                    raise child.failure(
                        f"not ready after {self.health_timeout_s:.0f} s (GET {child.spec.ready_url}: "
                        f"{last_answer.get(child.spec.name, 'no answer')})"
                    )
                if pending:
                    self.stop_event.wait(0.5)

    def _main_finished(self) -> bool:
        """The main process has exited with status 0 (its work is done; the rest need not become ready)."""
        return any(c.spec.main and c.process.poll() == 0 for c in self.children.values())

    # ---------------------------------------------------------------- watch

    def check(self) -> str | None:
        """'finished' once the main process exited 0; else restarts what crashed (raising ClusterError without a
        restart policy or on a crash loop) and returns None."""
        now = time.monotonic()
        for name, due in list(self._due.items()):
            if now >= due and not self.stop_event.is_set():
                del self._due[name]
                self.children[name] = spawn(self.topology.by_name(name), self.run_dir, self.base_env)
                self.on_state(name, f"restarted ({self.history[name].restarts}x)")
        for child in list(self.children.values()):
            rc = child.process.poll()
            if rc is None:
                continue
            if child.spec.main and rc == 0:
                return "finished"
            self._crashed(child, rc, now)
        for keeper in self.keepers:
            keeper.check(now)
        return None

    def _crashed(self, child: Child, rc: int, now: float) -> None:
        """Schedules the restart of a child that exited unexpectedly, or raises ClusterError (no policy, crash loop)."""
        failure = child.failure(f"{exit_reason(rc)} unexpectedly")
        if self.restart is None:
            raise failure
        name = child.spec.name
        history = self.history.setdefault(name, CrashHistory(self.restart))
        backoff = history.crashed(now)
        if backoff is None:
            raise ClusterError(
                name, f"crash loop: {len(history.crashes)} crashes within {self.restart.window_s:.0f} s "
                f"(max_restarts={self.restart.max_restarts}); last: {failure.reason}", failure.log_tail,
            )  # fmt: skip
        log.warning("child crashed: restarting", extra=log_fields(name=name, reason=failure.reason,
                    backoff_s=backoff, restart=history.restarts))  # fmt: skip
        self.stopped.extend(stop_children([child], self.stop_grace_s, self.hurry_event))  # reaps its descendants
        del self.children[name]
        self._due[name] = now + backoff
        self.on_state(name, f"crashed, restart {history.restarts} in {backoff:.0f} s")

    def restarts(self) -> dict[str, int]:
        """Restarts so far per process (children and keepers) that was restarted at least once."""
        counts = {name: h.restarts for name, h in self.history.items() if h.restarts}
        counts |= {k.name: k.history.restarts for k in self.keepers if k.history.restarts}
        return counts

    def watch(self, tick: Callable[[], None] | None = None, poll_s: float = 2.0) -> Outcome:
        """Until the run finishes, a stop is requested, or a child fails (ClusterError)."""
        t0 = time.monotonic()
        while True:
            if self.stop_event.is_set():
                return Outcome("interrupted", time.monotonic() - t0)
            reason = self.check()
            if reason:
                self.timings["run_s"] = time.monotonic() - t0
                return Outcome(reason, time.monotonic() - t0)
            if tick:
                try:
                    tick()
                except Exception as exc:  # a display problem must never stop the cluster
                    log.warning("progress update failed", extra=log_fields(error=repr(exc)))
            self.stop_event.wait(min(poll_s, 0.5) if tick is None else poll_s)

    # ---------------------------------------------------------------- stop

    def stop(self, names: Sequence[str] | None = None) -> list[StopResult]:
        """Stops the named children (default: all), in reverse start order, wave by wave."""
        t0 = time.monotonic()
        wanted = set(names) if names is not None else set(self.children)
        order = [s.name for wave in self.topology.start_waves() for s in wave]
        waves: list[list[Child]] = []
        for wave in reversed(self.topology.start_waves()):
            batch = [self.children[s.name] for s in wave if s.name in wanted and s.name in self.children]
            if batch:
                waves.append(batch)
        results = []
        for batch in waves:
            for child in batch:
                self.on_state(child.spec.name, "stopping")
            results.extend(stop_children(batch, self.stop_grace_s, self.hurry_event))
            for child in batch:
                self.on_state(child.spec.name, "stopped")
                del self.children[child.spec.name]
        results.sort(key=lambda r: order.index(r.name) if r.name in order else 0)
        self.stopped.extend(results)
        self.timings["stop_s"] = self.timings.get("stop_s", 0.0) + time.monotonic() - t0
        return results

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, hurry: threading.Event, received: list[int] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop` (a graceful stop); a second one sets `hurry` (kill without grace).
    Each signal's number is appended to `received` (the exit status is 128 + the first)."""

    def handler(signum: int, frame: object) -> None:
        if received is not None:
            received.append(signum)
        if stop.is_set():
            hurry.set()
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_blocked(*sigs: signal.Signals) -> Iterator[None]:
    """Blocks sigs in this thread; processes started meanwhile inherit the block.

    Used to start the embedded redis-server: it is not in a session of its own, and with SIGINT
    blocked a Ctrl-C at the terminal does not stop it before the services are done with it (it
    still stops on the SIGTERM its owner sends).
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(sigs))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
