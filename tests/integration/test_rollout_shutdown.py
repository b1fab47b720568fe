"""Shutdown of a rollout replica that is still starting, or whose learner is gone (real Redis, real processes).

Two defects seen under `aisrl up` (SIGTERM, then SIGKILL after the supervisor's grace period):
- A SIGTERM while the engine was still loading waited for the whole load (vLLM on the CPU: 15-40 s).
  Now serve() stops waiting at once; the load, which cannot be interrupted, is abandoned: in-process it
  closes its engine itself when it ends, and `aisrl rollout` stops the load's child processes and exits 0.
- A replica retrying weight fetches from a dead learner never stopped: its follower task's cancellation was
  dropped by Python 3.11's `asyncio.wait_for`, which redis-py uses to send every command, and serve() waited
  for the follower forever. The follower now honours a cancellation it did not receive as an exception.

The engine is the fake one (rollout_support.FakeEngine) except in the test marked `vllm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from rollout_support import (  # tests/integration is on sys.path (pytest's rootdir-relative import mode)
    FakeEngine,
    get_echo_task,
    parse_echo_problem,
    read_until,
    write_base_model,
)

from aisrl import streams
from aisrl.cluster.supervisor import group_members
from aisrl.redis_conn import async_client, free_port
from aisrl.services.rollout import main as rollout_main
from aisrl.services.rollout.config import RolloutSettings
from aisrl.services.rollout.metrics import RolloutMetrics
from aisrl.services.rollout.weights_client import WeightsFollower
from aisrl.v1 import weights_pb2

RUN = "run-1"
KEYS = streams.RunStreams(RUN)
SUPPORT = str(Path(__file__).parent / "rollout_support.py")


def make_settings(redis_url: str, tmp_path: Path, **overrides) -> RolloutSettings:
    values = dict(
        redis_url=redis_url, run_id=RUN, worker_id="w1", batch_size=4, block_ms=50, http_port=0,
        max_trajectories_backlog=0, catch_up_timeout_s=0, weights_retry_base_s=0.05, weights_retry_max_s=0.2,
        model_path=str(write_base_model(tmp_path / "base")), work_dir=str(tmp_path / "work"),
    )  # fmt: skip
    values.update(overrides)
    return RolloutSettings(**values)


def dead_learner_notice(version: int = 1) -> bytes:
    """A notice whose endpoint nothing listens on: the learner that published it has exited."""
    return weights_pb2.WeightVersionNotice(
        run_id=RUN, version=version, step=version, endpoint=f"127.0.0.1:{free_port()}", sha256="00" * 32,
        total_bytes=1, num_tensors=1, created_unix=time.time(),
    ).SerializeToString()  # fmt: skip


async def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def finished_within(task: asyncio.Task, seconds: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return task in done


# ----------------------------------------------------------------------------- a follower whose learner is gone


class WaitForXread:
    """The real client, with xread sent through `asyncio.wait_for` as redis-py 8 sends every command.

    `cancel_on_reply(task)`: the next xread cancels `task` in the loop iteration its reply arrives in, the
    race in which Python 3.11's wait_for returns the reply and drops the cancellation (fixed in 3.12).
    """

    def __init__(self, client) -> None:
        self.client = client
        self.dropped = 0
        self._target: asyncio.Task | None = None

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def cancel_on_reply(self, task: asyncio.Task) -> None:
        self._target = task

    async def xread(self, *args, **kwargs):
        reply = asyncio.ensure_future(self.client.xread(*args, **kwargs))
        target, self._target = self._target, None
        if target is not None:
            reply.add_done_callback(lambda _: target.cancel())
        result = await asyncio.wait_for(reply, timeout=60)
        if target is not None and target.cancelling():
            self.dropped += 1  # still running although cancelled: the cancellation was lost
        return result


async def test_a_follower_retrying_a_dead_learner_stops_even_when_wait_for_drops_its_cancellation(redis_url, tmp_path):
    real = async_client(redis_url)
    client = WaitForXread(real)
    await streams.append(real, KEYS.weights, dead_learner_notice())
    follower = WeightsFollower(
        client, KEYS, base_model_dir=write_base_model(tmp_path / "base"), out_dir=tmp_path / "weights",
        current_version=0, fetch_timeout_s=5, retry_base_s=0.02, retry_max_s=0.05, chunk_bytes=1024,
        max_message_bytes=1 << 20, metrics=RolloutMetrics(),
    )  # fmt: skip
    task = asyncio.create_task(follower.run())
    try:
        await wait_until(lambda: follower.total_failures >= 2, what="the follower to retry the dead learner")
        client.cancel_on_reply(task)
        stopped = await finished_within(task, 5)
        failures = follower.total_failures
        if sys.version_info < (3, 12):
            assert client.dropped == 1, "the race did not happen: asyncio.wait_for delivered the cancellation"
        assert stopped, f"the follower ignored its cancellation and kept retrying ({failures} fetch failures)"
        assert task.cancelled(), f"the follower ended without being cancelled: {task!r}"
    finally:
        task.cancel()  # a second cancel lands in a blocking read: stops the old code too
        await asyncio.gather(task, return_exceptions=True)
        await real.aclose()


class DropsACancellationInXread:
    """The real client, except that `drops` cancellations arriving during an xread are lost (the reply is returned).

    Stands in for the wait_for race above at the one moment that matters, serve() cancelling the follower on
    the way out, which a real race cannot be made to hit on demand.
    """

    def __init__(self, client, drops: int = 1) -> None:
        self.client = client
        self.drops = drops
        self.dropped = 0

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    async def xread(self, *args, **kwargs):
        reply = asyncio.ensure_future(self.client.xread(*args, **kwargs))
        try:
            return await asyncio.shield(reply)
        except asyncio.CancelledError:
            if self.dropped >= self.drops:
                reply.cancel()
                raise
            self.dropped += 1
            return await reply


async def test_serve_stops_promptly_while_its_follower_retries_a_dead_learner(redis_url, tmp_path, monkeypatch):
    """The `aisrl up` defect: the learner exited, the replica logged "worker stopped", then hung in serve()'s
    `finally` (the follower kept retrying) until the supervisor's SIGKILL."""
    clients: list[DropsACancellationInXread] = []

    def client_factory(url: str) -> DropsACancellationInXread:
        clients.append(DropsACancellationInXread(async_client(url)))
        return clients[-1]

    monkeypatch.setattr(rollout_main, "async_client", client_factory)
    writer = async_client(redis_url)
    await streams.append(writer, KEYS.weights, dead_learner_notice())
    # A long backoff after the first failure: when serve() cancels the follower it waits in xread.
    settings = make_settings(redis_url, tmp_path, weights_retry_base_s=30, weights_retry_max_s=30)
    stop = asyncio.Event()
    ports: list[int] = []
    engine = FakeEngine()
    task = asyncio.create_task(
        rollout_main.serve(settings, redis_url, engine_factory=lambda _m, _w: engine, tasks=get_echo_task,
                           parse_problem=parse_echo_problem, stop=stop, install_signals=False,
                           on_http_port=ports.append)
    )  # fmt: skip
    try:
        await wait_until(lambda: ports, what="the HTTP port")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", timeout=10) as http:

            async def fetch_failures() -> float:
                for line in (await http.get("/metrics")).text.splitlines():
                    if line.startswith("aisrl_rollout_weights_fetch_failures_total "):
                        return float(line.split()[1])
                raise AssertionError("no aisrl_rollout_weights_fetch_failures_total in /metrics")

            deadline = time.monotonic() + 30
            while await fetch_failures() < 1:
                assert time.monotonic() < deadline, "the follower never tried the dead learner"
                await asyncio.sleep(0.05)
        stop.set()
        stopped = await finished_within(task, 10)
        assert clients and clients[0].dropped == 1, "serve()'s cancellation of the follower was not the one dropped"
        assert stopped, "serve() did not return within 10 s of the stop: the follower kept retrying the dead learner"
        assert task.result() is True
        assert engine.closed, "the engine was not closed"
    finally:
        stop.set()
        if not task.done():
            for other in asyncio.all_tasks():  # unwedge the old code so the test can end
                if other is not asyncio.current_task() and "WeightsFollower.run" in repr(other):
                    other.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)
        await writer.aclose()


# ----------------------------------------------------------------------------- a stop while the engine loads


class RecordingEngine(FakeEngine):
    def close(self) -> None:
        self.closed_on = threading.current_thread().name
        super().close()


async def test_a_stop_while_the_engine_loads_returns_at_once_and_the_late_engine_is_closed(redis_url, tmp_path):
    gate = threading.Event()
    made: list[RecordingEngine] = []
    load_threads: list[str] = []

    def slow_factory(model_dir: Path, work_dir: Path) -> RecordingEngine:
        load_threads.append(threading.current_thread().name)
        gate.wait(60)
        made.append(RecordingEngine(model_dir=model_dir))
        return made[-1]

    stop = asyncio.Event()
    ports: list[int] = []
    task = asyncio.create_task(
        rollout_main.serve(make_settings(redis_url, tmp_path), redis_url, engine_factory=slow_factory,
                           tasks=get_echo_task, parse_problem=parse_echo_problem, stop=stop, install_signals=False,
                           on_http_port=ports.append)
    )  # fmt: skip
    try:
        await wait_until(lambda: load_threads, what="the engine load to start")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", timeout=10) as http:
            not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["problems"] == ["engine not loaded yet"]
        stop.set()
        assert await finished_within(task, 5), "serve() waited for the engine load after the stop"
        assert task.result() is False, "serve() must report the load it left running"
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", timeout=2) as http:
                await http.get("/healthz")
    finally:
        gate.set()
    await wait_until(lambda: made and getattr(made[0], "closed_on", None), timeout=10, what="the late engine's close")
    assert made[0].closed_on == load_threads[0], "the engine must be closed on the thread that made it"


def _stop_and_check(proc: subprocess.Popen, children: list[psutil.Process], within_s: float) -> str:
    """SIGTERM, then: exits 0 within `within_s`, and neither `children` nor anything of its group is left."""
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no exit within {within_s} s of SIGTERM during the engine load") from None
    took = time.monotonic() - t0
    output = proc.stdout.read()
    assert rc == 0, f"exit status {rc} after SIGTERM during the engine load:\n{output}"
    _, alive = psutil.wait_procs(children, timeout=2)
    assert not alive, f"child processes left behind: {alive}\n{output}"
    left = [p for p in group_members(proc.pid) if p.pid != proc.pid]
    assert not left, f"processes left in the replica's process group: {left}\n{output}"
    return f"stopped in {took:.1f} s\n{output}"


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_sigterm_while_the_engine_loads_exits_0_promptly_and_stops_the_load_s_processes(redis_url, tmp_path):
    """A real replica process whose (fake) engine load starts a child process, as vLLM starts its engine core,
    then never finishes; SIGTERM arrives during the load."""
    settings = {"redis_url": redis_url, "run_id": RUN, "worker_id": "w-load", "http_port": 0,
                "work_dir": str(tmp_path / "work")}  # fmt: skip
    engine = {"load_gate_file": str(tmp_path / "never"), "load_spawns_child": True}
    proc = subprocess.Popen([sys.executable, SUPPORT, json.dumps(settings), json.dumps(engine)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        line = read_until(proc, "LOADING", max_lines=2000)
        child = psutil.Process(int(line.split()[1]))
        assert child.ppid() == proc.pid
        report = _stop_and_check(proc, [child], within_s=15)
        assert "stopped during start-up" in report, report
    finally:
        if proc.poll() is None:
            _kill_group(proc)


@pytest.mark.vllm
@pytest.mark.slow
def test_sigterm_while_vllm_loads_exits_0_promptly_and_leaves_no_process(redis_url, tmp_path):
    """`aisrl rollout --engine vllm` (spawned engine core) gets SIGTERM once its engine core process exists."""
    aisrl = str(Path(sys.executable).with_name("aisrl"))
    argv = [aisrl, "rollout", "--engine", "vllm", "--precision", "bf16", "--redis-url", redis_url, "--run-id", RUN,
            "--http-port", "0", "--work-dir", str(tmp_path / "work"), "--kv-cache-gb", "0.25",
            "--max-model-len", "128"]  # fmt: skip
    # An in-process vLLM engine made earlier in this pytest process leaves VLLM_ENABLE_V1_MULTIPROCESSING=0 in its
    # environment (vllm_engine.py); inherited, it would keep this replica from spawning the engine core under test.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING" and not k.startswith("AISRL_")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        read_until(proc, "rollout: HTTP", max_lines=2000)  # signal handlers are installed
        deadline = time.monotonic() + 240
        children: list[psutil.Process] = []
        while not children:  # vLLM started its engine core: the load is under way
            assert proc.poll() is None, f"the replica exited during start-up:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "vLLM never started a child process"
            time.sleep(0.1)
            children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(1.0)
        children = psutil.Process(proc.pid).children(recursive=True)
        report = _stop_and_check(proc, children, within_s=10)
        assert "stopped during start-up" in report, report
    finally:
        if proc.poll() is None:
            _kill_group(proc)
