"""The supervisor heals: restarts with backoff, a crash-loop limit, children that die with it, 143 on SIGTERM.

Most tests use fast fake children (`python -c ...`): what is tested is the supervisor's logic, which does
not depend on what the child is. One test runs the real `aisrl up` (tiny model, transformers rollout
engine), SIGKILLs a real rollout replica and checks it is restarted and counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest
from cluster_support import TreeWatcher, output, start_up  # tests/integration is on sys.path
from test_cluster_supervisor import cluster_yaml, tiny_model  # noqa: F401 - tiny_model is a fixture

from aisrl.cluster.restarts import CrashHistory, RestartSettings
from aisrl.cluster.supervisor import ClusterError, Supervisor
from aisrl.cluster.topology import ProcessSpec, Topology
from aisrl.redis_conn import free_port

pytestmark = pytest.mark.slow
FAST = RestartSettings(max_restarts=2, window_s=60, backoff_base_s=0.05, backoff_max_s=0.2)


def fake(name: str, code: str, main: bool = False) -> ProcessSpec:
    return ProcessSpec(name=name, service="test", argv=(sys.executable, "-c", textwrap.dedent(code)), env={},
                       settings={}, http_url=f"http://127.0.0.1:{free_port()}", main=main)  # fmt: skip


def topology_of(*specs: ProcessSpec) -> Topology:
    return Topology(run_id="t", redis_url="", processes=specs, dashboard_url="", learner_metrics_url="",
                    diagnostics_url="")  # fmt: skip


def started(supervisor: Supervisor) -> None:
    """Spawns every child without waiting for readiness (fake children serve no HTTP)."""
    from aisrl.cluster.supervisor import spawn

    for spec in supervisor.topology.processes:
        supervisor.children[spec.name] = spawn(spec, supervisor.run_dir)


def test_backoff_doubles_and_the_crash_past_the_limit_is_a_loop():
    history = CrashHistory(RestartSettings(max_restarts=3, window_s=10, backoff_base_s=1, backoff_max_s=3))
    assert [history.crashed(t) for t in (0, 1, 2)] == [1, 2, 3]
    assert history.crashed(3) is None  # the 4th crash within 10 s
    history = CrashHistory(RestartSettings(max_restarts=1, window_s=10, backoff_base_s=1))
    assert history.crashed(0) == 1 and history.crashed(20) == 1  # crashes outside the window are forgiven
    assert history.restarts == 2


def test_a_crashing_child_is_restarted_until_the_crash_loop_fails_the_run_with_its_log(tmp_path):
    crasher = fake("crasher", "print('config error: the answer is not 42', flush=True); raise SystemExit(3)")
    sleeper = fake("sleeper", "import time; time.sleep(600)")
    supervisor = Supervisor(topology_of(crasher, sleeper), tmp_path, stop_grace_s=5, restart=FAST)
    with supervisor, pytest.raises(ClusterError) as info:
        started(supervisor)
        supervisor.watch(poll_s=0.05)
    err = info.value
    assert err.name == "crasher" and "crash loop: 3 crashes within 60 s (max_restarts=2)" in err.reason
    assert "exited with status 3" in err.reason and "the answer is not 42" in err.log_tail
    assert supervisor.restarts() == {"crasher": 2}
    assert (tmp_path / "logs" / "crasher.log").read_text().count("===== ") == 3  # started 3 times


def test_a_child_that_crashes_once_is_restarted_and_the_run_finishes(tmp_path):
    marker = tmp_path / "crashed-once"
    flaky = fake(
        "flaky",
        f"""
        import pathlib, time
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.touch(); raise SystemExit(1)
        time.sleep(600)
    """,
    )
    main = fake("main", f"""
        import pathlib, time
        while not pathlib.Path({str(marker)!r}).exists(): time.sleep(0.05)
        time.sleep(1.0)  # the flaky child is restarted meanwhile
    """, main=True)  # fmt: skip
    states: dict[str, str] = {}
    supervisor = Supervisor(topology_of(flaky, main), tmp_path, stop_grace_s=5, restart=FAST,
                            on_state=states.__setitem__)  # fmt: skip
    with supervisor:
        started(supervisor)
        assert supervisor.watch(poll_s=0.05).reason == "finished"
        assert supervisor.children["flaky"].process.poll() is None  # running again
        assert states["flaky"] == "restarted (1x)"
    assert supervisor.restarts() == {"flaky": 1}


def test_without_a_restart_policy_a_crash_fails_the_run_at_once(tmp_path):
    supervisor = Supervisor(topology_of(fake("c", "raise SystemExit(2)")), tmp_path, stop_grace_s=5)
    with supervisor, pytest.raises(ClusterError, match="exited with status 2 unexpectedly"):
        started(supervisor)
        supervisor.watch(poll_s=0.05)


ORPHANING_SUPERVISOR = """
import sys, time
from pathlib import Path
from aisrl.cluster.supervisor import spawn
from aisrl.cluster.topology import ProcessSpec
from aisrl.redis_conn import start_embedded_redis

run_dir = Path(sys.argv[1])
spec = ProcessSpec(name="child", service="test", argv=(sys.executable, "-c", "import time; time.sleep(600)"),
                   env={}, settings={}, http_url="")
child = spawn(spec, run_dir)
redis = start_embedded_redis(data_dir=run_dir / "redis", die_with_parent=True)
print(child.pid, redis.process.pid, flush=True)
time.sleep(600)
"""


def test_children_and_redis_die_with_a_sigkilled_supervisor(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ORPHANING_SUPERVISOR, str(tmp_path)], stdout=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        child_pid, redis_pid = (int(x) for x in proc.stdout.readline().split())
        assert psutil.pid_exists(child_pid) and psutil.pid_exists(redis_pid)
        proc.kill()  # SIGKILL: no handler, no cleanup in the supervisor
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs([psutil.Process(p) for p in (child_pid, redis_pid) if psutil.pid_exists(p)],
                                        timeout=10)  # fmt: skip
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_restarts_a_killed_replica_counts_it_and_exits_143_on_sigterm(tmp_path, tiny_model):  # noqa: F811
    config = cluster_yaml(tmp_path, tiny_model, steps=100_000, restart={"backoff_base_s": 0.2})
    up = start_up(config, "heal")
    watcher = TreeWatcher(up.pid)
    run_dir = tmp_path / "runs" / "heal"
    rollout_log = run_dir / "logs" / "rollout-0.log"
    try:
        deadline = time.monotonic() + 300
        rollout = None
        while time.monotonic() < deadline and up.poll() is None and rollout is None:
            topo = run_dir / "topology.json"
            if topo.exists():
                spec = next(p for p in json.loads(topo.read_text())["processes"] if p["name"] == "rollout-0")
                rollout = spec if _ready(spec["ready_url"]) else None
            time.sleep(0.5)
        assert rollout, output(up) if up.poll() is not None else "rollout-0 not ready in time"
        [victim] = [p for p in watcher.seen.values() if "rollout" in " ".join(p.cmdline())
                    and p.ppid() == up.pid]  # fmt: skip
        victim.kill()
        while time.monotonic() < deadline and not _ready(rollout["ready_url"]):
            time.sleep(0.5)
        assert _ready(rollout["ready_url"]), "rollout-0 was not restarted"
        assert rollout_log.read_text().count("===== ") == 2
        os.killpg(up.pid, signal.SIGTERM)
        rc = up.wait(timeout=180)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    text = output(up)
    assert rc == 143, text
    assert watcher.survivors() == []
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "interrupted" and report["restarts"] == {"rollout-0": 1}
