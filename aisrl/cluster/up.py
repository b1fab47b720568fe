"""`aisrl up` from settings to report: model, Redis, step-0 evaluation, processes, progress, stop, report.

Invariant: whatever happens (the run finishes, Ctrl-C, a child dies, start-up fails), every child
is stopped before Redis is, Redis before this returns, and a report of what was measured is
written to `<out_dir>/<run_id>/` (its `outcome` says which of these happened).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from aisrl.cluster.baseline import cached_initial
from aisrl.cluster.config import ClusterSettings
from aisrl.cluster.progress import Poller, Snapshot, one_line, render
from aisrl.cluster.report import build_summary, learner_events, learner_starts, write_report
from aisrl.cluster.restarts import CrashHistory, RestartSettings
from aisrl.cluster.supervisor import (
    ClusterError,
    Supervisor,
    exit_reason,
    run_job,
    signals_blocked,
    stop_on_signals,
    tail,
)
from aisrl.cluster.topology import Topology, build_model_init, build_topology, log_path, resolve_ports
from aisrl.logs import log_fields
from aisrl.redis_conn import EmbeddedRedis, RedisUnavailableError, free_port, start_embedded_redis

log = logging.getLogger("aisrl.cluster")

EXIT_FINISHED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130  # interrupted by a signal: 128 + its number (143: SIGTERM)


class Stopped(Exception):
    """A stop was requested (Ctrl-C/SIGTERM) before the cluster was running."""


def ensure_model(settings: ClusterSettings, stop: threading.Event, console: Console) -> float:
    """Creates the model directory with `aisrl model init` when it has no config.json; returns the seconds spent.

    The model is written to a sibling `.partial` directory and renamed when complete, so an
    interrupted creation never leaves a directory that looks like a model.
    """
    target = settings.resolved_model_dir
    if (target / "config.json").is_file():
        return 0.0
    partial = target.with_name(target.name + ".partial")
    spec = build_model_init(settings, partial)
    logfile = log_path(settings.run_dir, spec)
    console.print(f"[bold]model[/]: {target} is missing; creating it with `aisrl model init` (log: {logfile})")
    started = time.monotonic()
    with console.status("warm-starting the tiny model on the task's reference solutions ..."):
        rc = run_job(spec, settings.run_dir, stop, settings.stop_grace_s)
    if rc is None:
        raise Stopped()
    if rc != 0:
        raise ClusterError("model-init", exit_reason(rc), tail(logfile))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(target)
    seconds = time.monotonic() - started
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        after = json.loads((target / "warmstart.json").read_text())["result"]["after"]
        console.print(f"[bold]model[/]: created in {seconds:.0f} s; warm-start greedy accuracy {after['accuracy']:.1%} "
                      f"on {after['n']} held-out problems")  # fmt: skip
    return seconds


def _start_redis(data_dir: Path, port: int = 0) -> EmbeddedRedis:
    # Blocked SIGINT is inherited: a Ctrl-C at the terminal must not stop Redis before the services are done.
    try:
        with signals_blocked(signal.SIGINT):
            return start_embedded_redis(port=port, data_dir=data_dir, appendonly=True, die_with_parent=True)
    except RedisUnavailableError as exc:
        raise ClusterError("redis", str(exc)) from None


class RedisKeeper:
    """The embedded Redis, restarted on the same port and AOF when it dies (a supervisor Keeper)."""

    name = "redis"

    def __init__(self, server: EmbeddedRedis, restart: RestartSettings) -> None:
        self.server = server
        self.history = CrashHistory(restart)
        self._due: float | None = None

    def check(self, now: float) -> None:
        if self._due is not None:
            if now >= self._due:
                self._due = None
                self.server = _start_redis(self.server.data_dir, self.server.port)
                log.warning("redis restarted on its AOF", extra=log_fields(port=self.server.port,
                            restart=self.history.restarts))  # fmt: skip
            return
        rc = self.server.process.poll()
        if rc is None:
            return
        backoff = self.history.crashed(now)
        excerpt = tail(self.server.data_dir / "redis.log")
        if backoff is None:
            raise ClusterError("redis", f"crash loop: {exit_reason(rc)}, {len(self.history.crashes)} crashes within "
                               f"{self.history.settings.window_s:.0f} s", excerpt)  # fmt: skip
        log.warning("redis crashed: restarting", extra=log_fields(reason=exit_reason(rc), backoff_s=backoff))
        self._due = now + backoff

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def redis_for(settings: ClusterSettings, console: Console) -> Iterator[tuple[str, RedisKeeper | None]]:
    """The configured Redis URL, or an embedded server (AOF in the run's redis dir, restarted when it dies)
    living for the context, with its keeper."""
    if settings.redis_url:
        yield settings.redis_url, None
        return
    # The directory is made absolute: redis-server changes into it before it opens its log file.
    keeper = RedisKeeper(_start_redis(settings.resolved_redis_dir.resolve()), settings.restart)
    console.print(f"[bold]redis[/]: embedded at {keeper.server.url} (AOF in {settings.resolved_redis_dir})")
    try:
        yield keeper.server.url, keeper
    finally:
        keeper.stop()


def _states(supervisor: Supervisor, topology: Topology, states: dict[str, str]) -> dict[str, str]:
    for spec in topology.processes:
        child = supervisor.children.get(spec.name)
        if child is not None and states.get(spec.name) == "ready" and child.process.poll() is None:
            states[spec.name] = f"running (pid {child.pid})"
    return states


def _snapshot(supervisor: Supervisor, poller: Poller, topology: Topology, states: dict[str, str]) -> Snapshot:
    return dataclasses.replace(poller.poll(_states(supervisor, topology, states)), restarts=supervisor.restarts())


def run_cluster(settings: ClusterSettings, console: Console | None = None) -> int:
    """Runs the cluster until `steps`, Ctrl-C or a failure; writes the report; returns the exit status."""
    console = console or Console()
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cluster.json").write_text(settings.model_dump_json(indent=2) + "\n")
    stop, hurry = threading.Event(), threading.Event()
    received: list[int] = []  # the signals that stopped the run
    timings: dict[str, float] = {}
    _log_to_file(run_dir / "logs" / "up.log")
    t0 = time.monotonic()
    console.print(f"[bold]aisrl up[/]: run {settings.run_id} -> {run_dir}  ({settings.replicas} rollout replicas, "
                  f"{settings.steps} steps, task {settings.task})")  # fmt: skip
    with stop_on_signals(stop, hurry, received):
        try:
            timings["model_init_s"] = ensure_model(settings, stop, console)
            with redis_for(settings, console) as (redis_url, keeper):
                topology = build_topology(settings, resolve_ports(settings, free_port), redis_url)
                (run_dir / "topology.json").write_text(json.dumps(_topology_json(topology), indent=2) + "\n")
                rc = _run(settings, topology, console, stop, hurry, timings, t0, [keeper] if keeper else [])
                return 128 + received[0] if rc == EXIT_INTERRUPTED and received else rc
        except Stopped:
            console.print("[yellow]stopped before the cluster was running[/]")
            return 128 + received[0] if received else EXIT_INTERRUPTED
        except ClusterError as exc:
            console.print(f"[red bold]failed[/]: {exc}")
            return EXIT_FAILED


def _run(
    settings: ClusterSettings,
    topology: Topology,
    console: Console,
    stop: threading.Event,
    hurry: threading.Event,
    timings: dict[str, float],
    t0: float,
    keepers: list[RedisKeeper],
) -> int:
    run_dir = settings.run_dir
    learner = next(p for p in topology.processes if p.main)
    initial = None
    if settings.baseline_eval:
        with console.status("evaluating the initial policy (step 0) on the held-out split ..."):
            started = time.monotonic()
            try:
                initial = cached_initial(run_dir / "initial_eval.json", learner.settings)
            except Exception as exc:  # the learner would fail the same way: say so before starting anything
                raise ClusterError("initial evaluation", f"{type(exc).__name__}: {exc}") from exc
            timings["initial_eval_s"] = time.monotonic() - started
        if initial:
            sampled = f", sampled {initial['sampled']:.1%}" if initial.get("sampled") is not None else ""
            console.print(f"[bold]step 0[/]: held-out greedy accuracy {initial['greedy']:.1%}{sampled} "
                          f"on {initial['n']} problems")  # fmt: skip
    if stop.is_set():
        return EXIT_INTERRUPTED
    states = {spec.name: "waiting" for spec in topology.processes}
    supervisor = Supervisor(
        topology, run_dir, health_timeout_s=settings.health_timeout_s, stop_grace_s=settings.stop_grace_s,
        stop_event=stop, hurry_event=hurry, on_state=lambda name, state: states.__setitem__(name, state),
        restart=settings.restart, keepers=keepers,
    )  # fmt: skip
    poller = Poller(topology, settings.steps)
    poller.initial_accuracy = initial["greedy"] if initial else None
    outcome, error = "interrupted", None
    console.print(f"[bold]dashboard[/]: {topology.dashboard_url}")
    console.print(f"logs: {run_dir / 'logs'}/<process>.log")
    try:
        with console.status("starting diagnostics, learner and rollouts (the engines load their models) ..."):
            supervisor.start()
        if not stop.is_set():
            outcome = _watch(supervisor, poller, topology, states, settings, console).reason
    except ClusterError as exc:
        outcome, error = "failed", str(exc)
        console.print(f"[red bold]{exc.name} failed[/]: {exc.reason}")
        if exc.log_tail:
            console.print(f"--- last lines of {exc.name}'s log ---\n{exc.log_tail}", markup=False, highlight=False)
    finally:
        console.print("stopping the cluster ...")
        others = [name for name in supervisor.children if name != "diagnostics"]
        results = supervisor.stop(others)  # rollouts and learner first: diagnostics keeps serving the records
        with contextlib.suppress(Exception):
            poller.fetch_new_batches()
        results += supervisor.stop()
        poller.close()
        for r in results:
            how = "killed after the grace period" if r.killed else "stopped"
            console.print(f"  {r.name}: {how} (exit {r.returncode}, {r.seconds:.1f} s)")
    timings.update(supervisor.timings)
    timings["total_s"] = time.monotonic() - t0
    paths = _report(settings, topology, outcome, error, poller.batches, initial, timings, supervisor.restarts())
    console.print(f"[bold]report[/]: {paths['summary']}  plots: {paths['learning']}, {paths['ais']}")
    _print_result(console, json.loads(paths["summary"].read_text()))
    return {"finished": EXIT_FINISHED, "interrupted": EXIT_INTERRUPTED}.get(outcome, EXIT_FAILED)


def _watch(supervisor: Supervisor, poller: Poller, topology: Topology, states: dict[str, str],
           settings: ClusterSettings, console: Console):  # fmt: skip
    last_step: list[int | None] = [None]
    if console.is_terminal:
        with Live(render(_snapshot(supervisor, poller, topology, states)), console=console,
                  refresh_per_second=1, transient=False) as live:  # fmt: skip

            def tick() -> None:
                live.update(render(_snapshot(supervisor, poller, topology, states)))

            return supervisor.watch(tick, settings.poll_s)

    def tick_plain() -> None:
        snap = _snapshot(supervisor, poller, topology, states)
        if snap.step is not None and snap.step != last_step[0]:
            last_step[0] = snap.step
            console.print(one_line(snap), markup=False, highlight=False, soft_wrap=True)

    return supervisor.watch(tick_plain, settings.poll_s)


def _report(
    settings: ClusterSettings,
    topology: Topology,
    outcome: str,
    error: str | None,
    batches: list[dict[str, Any]],
    initial: dict[str, Any] | None,
    timings: dict[str, float],
    restarts: dict[str, int],
) -> dict[str, Path]:
    learner = next(p for p in topology.processes if p.main)
    path = log_path(settings.run_dir, learner)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    steps, evals = learner_events(lines)
    summary = build_summary(
        run_id=settings.run_id, outcome=outcome, error=error, settings=settings.model_dump(mode="json"),
        services={p.name: p.settings for p in topology.processes}, steps=steps, evals=evals, batches=batches,
        initial_eval=initial, timings=timings, dashboard_url=topology.dashboard_url, starts=learner_starts(lines),
        restarts=restarts,
    )  # fmt: skip
    paths = write_report(settings.run_dir, summary)
    log.info("report written", extra=log_fields(path=str(paths["summary"]), outcome=outcome))
    return paths


def _print_result(console: Console, summary: dict[str, Any]) -> None:
    acc = summary["accuracy"]
    first, last = acc["initial"], acc["final"]
    reached = summary["steps"]["reached"]
    console.print(f"[bold]{summary['outcome']}[/] after {reached} of {summary['steps']['target']} steps "
                  f"in {summary['timings_s'].get('total_s', 0):.0f} s")  # fmt: skip
    if summary["resumed_from"] is not None:
        console.print(f"resumed from the checkpoint of step {summary['resumed_from']} (the report covers every step)")
    if first and last and first.get("greedy") is not None and last.get("greedy") is not None:
        console.print(f"held-out greedy accuracy: step {first['step']}: {first['greedy']:.1%} -> "
                      f"step {last['step']}: {last['greedy']:.1%} ({acc['change']:+.1%})")  # fmt: skip
        if first.get("sampled") is not None and last.get("sampled") is not None:
            console.print(f"held-out sampled accuracy: step {first['step']}: {first['sampled']:.1%} -> "
                          f"step {last['step']}: {last['sampled']:.1%} ({acc['sampled_change']:+.1%})")  # fmt: skip
    reward = summary["reward"]
    if reward["first_steps_mean"] is not None:
        console.print(f"mean reward: first {reward['window']} steps {reward['first_steps_mean']:.3f} -> "
                      f"last {reward['window']} steps {reward['last_steps_mean']:.3f}")  # fmt: skip


def _log_to_file(path: Path) -> None:
    """The supervisor's structured log: everything as JSON lines in the run's logs, warnings also on stderr."""
    from aisrl.logs import _Formatter

    path.parent.mkdir(parents=True, exist_ok=True)
    cluster_log = logging.getLogger("aisrl.cluster")
    for handler in list(cluster_log.handlers):
        cluster_log.removeHandler(handler)
        handler.close()
    to_file = logging.FileHandler(path)
    to_file.setFormatter(_Formatter(as_json=True))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(_Formatter(as_json=False))
    cluster_log.addHandler(to_file)
    cluster_log.addHandler(to_terminal)
    cluster_log.setLevel(logging.INFO)
    cluster_log.propagate = False


def _topology_json(topology: Topology) -> dict[str, Any]:
    return {
        "run_id": topology.run_id, "redis_url": topology.redis_url, "dashboard_url": topology.dashboard_url,
        "processes": [{"name": p.name, "service": p.service, "argv": list(p.argv), "env": dict(p.env),
                       "ready_url": p.ready_url, "after": list(p.after), "main": p.main} for p in topology.processes],
    }  # fmt: skip
