"""The supervisor with real processes: `aisrl up` end to end, Ctrl-C, a crash at start, a stubborn child.

Every test checks with psutil that no child or grandchild of what it started is left. The cluster
runs on a random tiny model with the transformers rollout engine (`engine: hf`) so that it starts
in seconds; `aisrl up` with vLLM rollouts (and a resumed run) is tests/integration/test_cluster_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from cluster_support import TreeWatcher, output, start_up, wait_up, write_yaml  # tests/integration is on sys.path

from aisrl.cluster.config import load_cluster_settings
from aisrl.cluster.supervisor import ClusterError, Supervisor, spawn, stop_children
from aisrl.cluster.topology import ProcessSpec, Topology, build_topology, resolve_ports
from aisrl.redis_conn import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from aisrl.models.tiny import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def cluster_yaml(tmp_path: Path, model: Path, steps: int, **extra) -> Path:
    config = {
        "steps": steps, "replicas": 1, "model_dir": str(model), "out_dir": str(tmp_path / "runs"),
        "baseline_eval": False, "health_timeout_s": 240, "stop_grace_s": 30, "poll_s": 0.5,
        "threads": {"learner": 1, "rollout": 1},
        "services": {
            "learner": {"batch_size": 2, "group_size": 2, "max_tokens": 8, "eval_every": 0, "checkpoint_every": 1},
            "rollout": {"engine": "hf", "batch_size": 2, "catch_up_timeout_s": 0},
        },
    } | extra  # fmt: skip
    return write_yaml(tmp_path / "cluster.yaml", config)


def test_up_trains_to_steps_then_stops_everything_and_writes_the_report(tmp_path, tiny_model):
    config = cluster_yaml(tmp_path, tiny_model, steps=2, baseline_eval=True,
                          services={"learner": {"batch_size": 2, "group_size": 2, "max_tokens": 8, "eval_every": 2,
                                                "eval_size": 4, "eval_samples": 0, "checkpoint_every": 1},
                                    "rollout": {"engine": "hf", "batch_size": 2, "catch_up_timeout_s": 0}})  # fmt: skip
    up = start_up(config, "fin")
    watcher = TreeWatcher(up.pid)
    rc, text = wait_up(up, 420)
    assert rc == 0, text
    assert watcher.survivors() == []
    assert len(watcher.seen) >= 4, "diagnostics, learner, a rollout and redis-server ran as descendants"
    run_dir = tmp_path / "runs" / "fin"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "finished" and report["steps"]["reached"] == 2
    assert report["accuracy"]["initial"]["step"] == 0 and report["accuracy"]["final"]["step"] == 2
    assert report["diagnostics_records"] >= 1 and report["per_step"][-1]["rho"] is not None
    assert (run_dir / "learning.png").stat().st_size > 0 and (run_dir / "ais.png").stat().st_size > 0
    for name in ("diagnostics", "learner", "rollout-0"):
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0
    assert "/v1/runs/fin/dashboard" in text


def test_ctrl_c_stops_every_child_and_grandchild(tmp_path, tiny_model):
    config = cluster_yaml(tmp_path, tiny_model, steps=100_000, replicas=2)
    up = start_up(config, "int")
    watcher = TreeWatcher(up.pid)
    run_dir = tmp_path / "runs" / "int"
    try:
        deadline = time.monotonic() + 300
        learner_ready = None
        while time.monotonic() < deadline and up.poll() is None:
            topo = run_dir / "topology.json"
            if topo.exists():
                learner = next(p for p in json.loads(topo.read_text())["processes"] if p["name"] == "learner")
                try:
                    if httpx.get(learner["ready_url"], timeout=1).status_code == 200:
                        learner_ready = learner
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        assert learner_ready, output(up) if up.poll() is not None else "learner not ready in time"
        time.sleep(3)  # let it train a little
        os.killpg(up.pid, signal.SIGINT)  # what a Ctrl-C at the terminal does: the foreground group
        rc = up.wait(timeout=180)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    text = output(up)
    assert rc == 130, text
    assert watcher.survivors() == []
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "interrupted"
    assert "killed after the grace period" not in text, text  # every child stopped on SIGTERM


def test_a_child_that_crashes_at_start_is_named_and_nothing_is_left(tmp_path, redis_url):
    settings = load_cluster_settings(None, {"run_id": "crash", "replicas": 1, "out_dir": str(tmp_path)})
    good = build_topology(settings, resolve_ports(settings, free_port), redis_url)
    rollout = good.by_name("rollout-0")
    env = {**rollout.env, "AISRL_ROLLOUT_MODEL_PATH": str(tmp_path / "nope")}
    broken = ProcessSpec(**{**rollout.__dict__, "env": env})
    topology = Topology(**{**good.__dict__, "processes": (good.by_name("diagnostics"), broken)})
    supervisor = Supervisor(topology, tmp_path, health_timeout_s=120, stop_grace_s=20)
    watcher = TreeWatcher(os.getpid())
    time.sleep(0.3)
    with pytest.raises(ClusterError) as info, supervisor:
        supervisor.start()
    err = info.value
    assert err.name == "rollout-0" and "exited with status 1 while starting" in err.reason
    assert "error: --model-path" in err.reason and "no such model directory" in err.reason
    assert not supervisor.children
    leftovers = [s for s in watcher.survivors() if "redis-server" not in s]  # the session's Redis fixture
    assert leftovers == []


def test_a_main_process_that_finishes_while_others_start_ends_the_run_as_finished(tmp_path):
    # What a resumed run already at its target steps does: the learner exits 0 before the rollouts are ready.
    def spec(name: str, code: str, main: bool = False) -> ProcessSpec:
        return ProcessSpec(name=name, service="test", argv=(sys.executable, "-c", code), env={}, settings={},
                           http_url=f"http://127.0.0.1:{free_port()}", main=main)  # fmt: skip

    main, slow = spec("main", "print('nothing left to do')", main=True), spec("slow", "import time; time.sleep(600)")
    topology = Topology(run_id="t", redis_url="", processes=(main, slow), dashboard_url="", learner_metrics_url="",
                        diagnostics_url="")  # fmt: skip
    supervisor = Supervisor(topology, tmp_path, health_timeout_s=120, stop_grace_s=5)
    started = time.monotonic()
    with supervisor:
        supervisor.start()  # returns once main has exited 0 (slow never becomes ready)
        assert supervisor.watch(poll_s=0.1).reason == "finished"
    assert time.monotonic() - started < 60
    assert not supervisor.children and {r.name for r in supervisor.stopped} == {"main", "slow"}
    assert not any(r.killed for r in supervisor.stopped)


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("pid of the grandchild:", child.pid, flush=True)
time.sleep(600)
"""


def test_a_child_ignoring_sigterm_is_killed_with_its_grandchildren(tmp_path):
    spec = ProcessSpec(name="stubborn", service="test", argv=(sys.executable, "-c", STUBBORN), env={}, settings={},
                       http_url="")  # fmt: skip
    child = spawn(spec, tmp_path)
    log = tmp_path / "logs" / "stubborn.log"
    deadline = time.monotonic() + 30
    pattern = re.compile(r"^pid of the grandchild: (\d+)$", re.M)
    while not pattern.search(log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = int(pattern.search(log.read_text()).group(1))
    assert psutil.pid_exists(grandchild)
    [result] = stop_children([child], grace_s=1.0)
    assert result.killed and result.returncode == -signal.SIGKILL
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
