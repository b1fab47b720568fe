"""The rollout worker against a real (embedded) Redis, a real gRPC Weights server and real HTTP.

The engine is a deterministic fake (rollout_support.FakeEngine) in every test but the last:
what is tested here is the stream semantics (exactly-once groups, reclaim, dead letters,
backpressure, weight versions, shutdown), which do not depend on the model. The "echo" task is
a stand-in with the aisrl.tasks interface. test_worker_with_real_vllm_engine runs the real
vLLM engine on a tiny random model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from rollout_support import (  # tests/integration is on sys.path (pytest's rootdir-relative import mode)
    FakeEngine,
    WeightsTestServer,
    get_echo_task,
    parse_echo_problem,
    prompt_job,
    read_until,
    tiny_state,
    write_base_model,
)

from aisrl import streams
from aisrl.redis_conn import async_client, free_port
from aisrl.services.rollout.app import RolloutState, create_app
from aisrl.services.rollout.config import RolloutSettings
from aisrl.services.rollout.metrics import RolloutMetrics
from aisrl.services.rollout.weights_client import WeightsFollower
from aisrl.services.rollout.worker import EngineBroken, RolloutWorker
from aisrl.v1 import common_pb2, rollout_pb2
from aisrl.wire.arrays import bytes_to_float32, bytes_to_int32

RUN = "run-1"
KEYS = streams.RunStreams(RUN)
GROUP = "rollout"
SUPPORT = str(Path(__file__).parent / "rollout_support.py")


def make_settings(redis_url: str, **overrides) -> RolloutSettings:
    values = dict(
        redis_url=redis_url, run_id=RUN, worker_id="w1", batch_size=4, block_ms=50, reclaim_interval_s=0.05,
        reclaim_idle_ms=60_000, backpressure_poll_s=0.02, weights_retry_base_s=0.05, weights_retry_max_s=0.2,
        weights_fetch_timeout_s=10, catch_up_timeout_s=10, http_port=0, max_trajectories_backlog=0,
    )  # fmt: skip
    values.update(overrides)
    return RolloutSettings(**values)


def make_worker(client, engine, settings, metrics=None, weights=None) -> RolloutWorker:
    return RolloutWorker(
        client, engine, settings, metrics or RolloutMetrics(), tasks=get_echo_task,
        parse_problem=parse_echo_problem, model_id="fake-model", weights=weights,
    )  # fmt: skip


class Running:
    """A worker loop as a task; stop() sets its stop event and waits for it."""

    def __init__(self, worker: RolloutWorker) -> None:
        self.worker = worker
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(worker.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, timeout=30)


async def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    """Polls an async (or plain) predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def groups_written(client) -> list[rollout_pb2.TrajectoryGroup]:
    return [rollout_pb2.TrajectoryGroup.FromString(f[b"pb"]) for _, f in await client.xrange(KEYS.trajectories)]


async def dead_letters(client) -> list[rollout_pb2.DeadLetter]:
    return [rollout_pb2.DeadLetter.FromString(f[b"pb"]) for _, f in await client.xrange(KEYS.deadletter)]


async def pending(client) -> int:
    return (await client.xpending(KEYS.prompts, GROUP))["pending"]


async def add_jobs(client, *job_ids: str, **fields) -> None:
    for job_id in job_ids:
        await streams.append(client, KEYS.prompts, prompt_job(job_id, **fields))


def count_of(groups) -> Counter:
    return Counter(g.job_id for g in groups)


def test_settings_carry_every_engine_knob():
    from aisrl.services.rollout.engine import EngineConfig

    settings = RolloutSettings(precision="nvfp4_w4a4", kv_cache_dtype="fp8_e5m2", kv_cache_gb=0.5)
    for name, info in EngineConfig.model_fields.items():
        assert name in RolloutSettings.model_fields, f"EngineConfig.{name} is missing from RolloutSettings"
        assert RolloutSettings.model_fields[name].description == info.description
    config = settings.engine_config()
    assert (config.precision, config.kv_cache_dtype, config.kv_cache_gb) == ("nvfp4_w4a4", "fp8_e5m2", 0.5)
    with pytest.raises(ValueError, match="greater than 0"):
        RolloutSettings(kv_cache_gb=0)


# ----------------------------------------------------------------------------- groups


async def test_each_job_becomes_one_complete_group_acked_with_it(client, redis_url):
    engine = FakeEngine()
    worker = make_worker(client, engine, make_settings(redis_url, initial_version=3))
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "j1", "j2", "j3", reference="abc")
    running = Running(worker)
    groups = await wait_until(lambda: _n_groups(client, 3), what="3 groups")
    await running.stop()
    assert sorted(g.job_id for g in groups) == ["j1", "j2", "j3"] and await pending(client) == 0
    g = groups[0]
    assert (g.run_id, g.task, g.problem_uid, g.policy_version) == (RUN, "echo", f"u-{g.job_id}", 3)
    assert g.precision == common_pb2.PRECISION_FP8_EMULATED and (g.worker_id, g.model_id) == ("w1", "fake-model")
    assert g.kv_cache_dtype == common_pb2.KV_CACHE_DTYPE_AUTO and not g.lm_head_quantized
    assert g.created_unix > 0 and g.timings.generate_s >= 0 and g.timings.queue_wait_s >= 0
    assert len(g.samples) == 4
    for i, s in enumerate(g.samples):
        ids = bytes_to_int32(s.completion_ids, "completion_ids")
        logprobs = bytes_to_float32(s.logprobs, "logprobs", expected=len(ids))
        assert "".join(map(chr, ids)) == s.text == ("abc\n" if i % 2 == 0 else "abc?\n")
        assert np.allclose(logprobs, -0.1 * np.arange(1, len(ids) + 1)) and np.all(np.isfinite(logprobs))
        assert bytes_to_int32(s.prompt_ids, "prompt_ids").tolist() == [1, *map(ord, "echo:abc")]
        assert s.reward == (1.0 if i % 2 == 0 else 0.0) and s.finish_reason == "stop"
    _, sampling = engine.calls[0]
    assert (sampling.n, sampling.max_tokens, sampling.temperature) == (4, 8, 1.0)
    assert worker.metrics.groups._value.get() == 3 and worker.metrics.tokens._value.get() == 3 * (4 + 5 + 4 + 5)


async def _n_groups(client, n: int):
    groups = await groups_written(client)
    return groups if len(groups) >= n else None


async def test_two_workers_share_a_run_without_duplicates(client, redis_url):
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    jobs = [f"j{i}" for i in range(24)]
    await add_jobs(client, *jobs)
    a = Running(make_worker(client, FakeEngine(delay_s=0.02), make_settings(redis_url, worker_id="a", batch_size=3)))
    b = Running(make_worker(client, FakeEngine(delay_s=0.02), make_settings(redis_url, worker_id="b", batch_size=3)))
    groups = await wait_until(lambda: _n_groups(client, len(jobs)), what="all groups")
    await a.stop()
    await b.stop()
    assert count_of(await groups_written(client)) == Counter(jobs)  # every job exactly once
    assert {g.worker_id for g in groups} == {"a", "b"} and await pending(client) == 0


async def test_killed_worker_jobs_are_reclaimed_exactly_once_by_the_survivor(client, redis_url, tmp_path):
    """Kill drill: a replica process is SIGKILLed mid-batch (jobs read, nothing written)."""
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    jobs = [f"j{i}" for i in range(6)]
    await add_jobs(client, *jobs)
    settings = {"redis_url": redis_url, "run_id": RUN, "worker_id": "doomed", "batch_size": 4, "http_port": 0,
                "work_dir": str(tmp_path / "doomed"), "block_ms": 50}  # fmt: skip
    engine = {"gate_file": str(tmp_path / "never"), "on_generate": "GENERATING"}
    proc = subprocess.Popen([sys.executable, SUPPORT, json.dumps(settings), json.dumps(engine)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        line = await asyncio.to_thread(read_until, proc, "GENERATING", 500)
        assert line.split() == ["GENERATING", "4"]
        proc.kill()  # no chance to release or write anything
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    owners = {p["consumer"] for p in await client.xpending_range(KEYS.prompts, GROUP, "-", "+", 10)}
    assert owners == {b"doomed"} and await pending(client) == 4
    survivor = make_worker(client, FakeEngine(), make_settings(redis_url, worker_id="survivor", reclaim_idle_ms=200))
    running = Running(survivor)
    await wait_until(lambda: _n_groups(client, len(jobs)), what="all groups")
    await running.stop()
    groups = await groups_written(client)
    assert count_of(groups) == Counter(jobs) and {g.worker_id for g in groups} == {"survivor"}
    assert survivor.metrics.reclaimed._value.get() == 4 and await pending(client) == 0


async def test_slow_worker_whose_jobs_were_reclaimed_writes_no_duplicate(client, redis_url):
    """A replica that is alive but slower than reclaim_idle_ms: the other takes its jobs over; the
    slow one's late results are dropped by the ownership check, so every job is written once."""
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "j1", "j2")
    gate = threading.Event()
    slow_engine = FakeEngine(gate=gate)
    slow = make_worker(client, slow_engine, make_settings(redis_url, worker_id="slow"))
    slow_run = Running(slow)
    try:
        await wait_until(slow_engine.entered.is_set, what="the slow worker to start generating")
        fast = make_worker(client, FakeEngine(), make_settings(redis_url, worker_id="fast", reclaim_idle_ms=50))
        fast_run = Running(fast)
        await wait_until(lambda: _n_groups(client, 2), what="the fast worker's groups")
        await fast_run.stop()
    finally:
        gate.set()
    await wait_until(lambda: slow.metrics.lost._value.get() == 2, what="the slow worker to drop its results")
    await slow_run.stop()
    groups = await groups_written(client)
    assert count_of(groups) == Counter(["j1", "j2"]) and {g.worker_id for g in groups} == {"fast"}
    assert await pending(client) == 0 and slow.metrics.groups._value.get() == 0


# ----------------------------------------------------------------------------- dead letters


async def test_bad_jobs_are_dead_lettered_with_their_reason_and_the_worker_keeps_running(client, redis_url):
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "good-1")
    bad = {
        "garbage": b"\xff\xff\xff\xff",
        "run": prompt_job("b-run", run_id="other-run"),
        "task": prompt_job("b-task", task="chess"),
        "problem": rollout_pb2.PromptJob(
            run_id=RUN, job_id="b-json", task="echo", problem_json="{nope", group_size=2, max_tokens=4, temperature=1.0
        ).SerializeToString(),
        "group_size": prompt_job("b-g0", group_size=0),
        "max_tokens": prompt_job("b-m0", max_tokens=0),
        "temperature": prompt_job("b-t0", temperature=0.0),
        "job_id": prompt_job(""),
        "nan": prompt_job("b-nan", marker="NAN"),
        "missing": prompt_job("b-missing", marker="MISSING"),
        "verifier": prompt_job("b-boom", reference="boom"),
    }
    ids = {}
    for name, payload in bad.items():
        ids[name] = await streams.append(client, KEYS.prompts, payload)
    ids["no-field"] = (await client.xadd(KEYS.prompts, {b"other": b"x"})).decode()
    await add_jobs(client, "good-2", "good-3")
    worker = make_worker(client, FakeEngine(), make_settings(redis_url, batch_size=5))
    running = Running(worker)
    await wait_until(lambda: _n_dead(client, len(ids)), what="dead letters")
    await wait_until(lambda: _n_groups(client, 3), what="the good groups")
    await running.stop()
    assert sorted(g.job_id for g in await groups_written(client)) == ["good-1", "good-2", "good-3"]
    reasons = {d.message_id: d.reason for d in await dead_letters(client)}
    expected = {
        "garbage": "not a PromptJob protobuf", "run": "'other-run' is not this worker's run",
        "task": "unknown task 'chess'",
        "problem": "not a valid problem", "group_size": "group_size 0", "max_tokens": "max_tokens 0",
        "temperature": "temperature 0.0", "job_id": "job_id is empty", "nan": "nan", "missing": "missing logprobs",
        "verifier": "verifier raised RuntimeError", "no-field": "no 'pb' field",
    }  # fmt: skip
    for name, fragment in expected.items():
        assert fragment in reasons[ids[name]], (name, reasons[ids[name]])
    records = {d.message_id: d for d in await dead_letters(client)}
    assert records[ids["garbage"]].payload == bad["garbage"] and records[ids["garbage"]].worker_id == "w1"
    assert await pending(client) == 0
    kinds = {s.labels["kind"]: s.value for m in worker.metrics.dead_lettered.collect() for s in m.samples
             if s.name.endswith("_total")}  # fmt: skip
    assert kinds["logprobs"] == 2 and sum(kinds.values()) == len(ids)


async def _n_dead(client, n: int):
    return len(await dead_letters(client)) >= n


async def test_restarts_and_takeovers_never_dead_letter_a_healthy_job(client, redis_url):
    """Redis counts every re-read after a restart and every takeover as a delivery; none is a crash."""
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "healthy")
    (entry,) = await streams.read_new(client, KEYS.prompts, GROUP, "gone-1", count=1, block_ms=None)
    for gone in ("gone-2", "gone-3"):  # taken over from consumers that left
        await client.xclaim(KEYS.prompts, GROUP, gone, 0, [entry.id])
    settings = make_settings(redis_url, reclaim_idle_ms=1, max_deliveries=2)
    for _ in range(4):  # w1 takes it, starts sampling, is stopped; restarted, it re-reads its own pending job
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        running = Running(make_worker(client, engine, settings))
        try:
            await wait_until(engine.entered.is_set, what="sampling")
            running.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running.task
        finally:
            gate.set()
    (row,) = await client.xpending_range(KEYS.prompts, GROUP, min="-", max="+", count=10)
    assert row["times_delivered"] >= 7  # far past max_deliveries
    running = Running(make_worker(client, FakeEngine(), settings))
    await wait_until(lambda: _n_groups(client, 1), what="the group")
    await running.stop()
    assert [g.job_id for g in await groups_written(client)] == ["healthy"] and await dead_letters(client) == []
    assert await client.hlen(KEYS.attempts) == 0  # resolved jobs leave no record


async def test_a_job_that_crashes_workers_is_dead_lettered_and_its_batch_mates_are_not(client, redis_url):
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "good-1")
    await add_jobs(client, "poison", marker="CRASH")
    await add_jobs(client, "good-2")
    settings = make_settings(redis_url, max_deliveries=2)
    for attempt in (1, 2):  # the worker crashes on it, is restarted (same id), and crashes again
        running = Running(make_worker(client, FakeEngine(), settings))
        with pytest.raises(RuntimeError, match="crashed on a prompt"):
            await asyncio.wait_for(running.task, timeout=30)
        charged = {k.decode(): int(v) for k, v in (await client.hgetall(KEYS.attempts)).items()}
        poison_id = (await client.xrange(KEYS.prompts))[1][0].decode()
        assert charged.pop(poison_id) == attempt and set(charged.values()) <= {0}  # its batch-mates are not charged
    running = Running(make_worker(client, FakeEngine(), settings))
    (record,) = await wait_until(lambda: dead_letters(client), what="the dead letter")
    await wait_until(lambda: _n_groups(client, 2), what="the good groups")
    await running.stop()
    assert "2 attempts to sample it never ended" in record.reason and "crashes workers" in record.reason
    assert sorted(g.job_id for g in await groups_written(client)) == ["good-1", "good-2"]
    assert await pending(client) == 0 and await client.hlen(KEYS.attempts) == 0


# ----------------------------------------------------------------------------- backpressure


async def test_backpressure_waits_until_the_learner_consumes(client, redis_url):
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await streams.ensure_group(client, KEYS.trajectories, "learner")
    await add_jobs(client, *[f"j{i}" for i in range(5)])
    worker = make_worker(client, FakeEngine(), make_settings(redis_url, batch_size=1, max_trajectories_backlog=2))
    running = Running(worker)
    await wait_until(lambda: worker.metrics.backpressure_waits._value.get() >= 1, what="a backpressure wait")
    assert len(await groups_written(client)) == 2  # and no more while the backlog is at its limit
    learned = await streams.read_new(client, KEYS.trajectories, "learner", "l", count=2, block_ms=None)
    await streams.ack(client, KEYS.trajectories, "learner", [e.id for e in learned])
    await wait_until(lambda: _n_groups(client, 4), what="two more groups")
    await asyncio.sleep(0.1)  # a few backlog polls: it must still hold at 4
    assert len(await groups_written(client)) == 4 and worker.metrics.backpressure_waits._value.get() >= 2
    await running.stop()
    assert await pending(client) == 0  # the fifth job was never read


# ----------------------------------------------------------------------------- weights


async def test_follows_weights_reloads_between_batches_and_survives_a_bad_checksum(client, redis_url, tmp_path):
    server = await WeightsTestServer().start()
    base = write_base_model(tmp_path / "base")
    settings = make_settings(redis_url)
    metrics = RolloutMetrics()
    follower = WeightsFollower(
        client, KEYS, base_model_dir=base, out_dir=tmp_path / "weights", current_version=0, fetch_timeout_s=10,
        retry_base_s=0.05, retry_max_s=0.2, chunk_bytes=1024, max_message_bytes=64 << 20, metrics=metrics,
    )  # fmt: skip
    follower_task = None
    gate = threading.Event()
    gate.set()
    engine = FakeEngine(gate=gate)
    worker = make_worker(client, engine, settings, metrics, weights=follower)
    running = None
    try:
        await streams.ensure_group(client, KEYS.prompts, GROUP)
        server.versions[1] = tiny_state(1)
        await streams.append(client, KEYS.weights, server.notice(RUN, 1))  # announced before the replica starts
        follower_task = asyncio.create_task(follower.run())
        assert await follower.wait_caught_up(10)
        running = Running(worker)
        await add_jobs(client, "j1", "j2")
        groups = await wait_until(lambda: _n_groups(client, 2), what="v1 groups")
        assert {g.policy_version for g in groups} == {1} and engine.loads == [tmp_path / "weights" / "v1"]
        assert _same_state(engine.loaded_state, tiny_state(1))
        assert (engine.loads[0] / "config.json").read_text() == (base / "config.json").read_text()
        assert (engine.loads[0] / "tokenizer.json").exists()

        # v2 arrives corrupted: the fetch fails its checksum, v1 stays, retries back off.
        server.versions[2] = tiny_state(2)
        server.corrupt.add(2)
        await streams.append(client, KEYS.weights, server.notice(RUN, 2))
        await wait_until(lambda: follower.total_failures >= 2, what="failed fetches")
        assert "sha256 mismatch" in follower.last_error and metrics.fetch_failures._value.get() >= 2
        await add_jobs(client, "j3")
        groups = await wait_until(lambda: _n_groups(client, 3), what="j3")
        assert groups[-1].job_id == "j3" and groups[-1].policy_version == 1 and worker.version == 1

        # Fixed while a batch is generating: that batch keeps v1, the next one runs v2.
        gate.clear()
        engine.entered.clear()
        await add_jobs(client, "j4")
        await wait_until(engine.entered.is_set, what="j4 generating")
        server.corrupt.discard(2)
        await wait_until(lambda: follower.newest_known == 2, what="v2 fetched")
        gate.set()
        await wait_until(lambda: worker.version == 2, what="v2 loaded")
        await add_jobs(client, "j5")
        groups = {g.job_id: g for g in await wait_until(lambda: _n_groups(client, 5), what="j5")}
        assert groups["j4"].policy_version == 1 and groups["j5"].policy_version == 2
        assert _same_state(engine.loaded_state, tiny_state(2)) and len(engine.loads) == 2
        assert not (tmp_path / "weights" / "v1").exists()  # the old version's files are cleaned up
        assert metrics.current_version == 2 and metrics.reloads._value.get() == 2
    finally:
        gate.set()
        if running:
            await running.stop()
        if follower_task:
            follower_task.cancel()
            await asyncio.gather(follower_task, return_exceptions=True)
        await server.stop()


def _same_state(a, b) -> bool:
    return (
        a is not None and sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in a)
    )


# ----------------------------------------------------------------------------- required versions, broken engines


@contextlib.asynccontextmanager
async def following(client, tmp_path, metrics, *, announce: int | None = None):
    """A WeightsTestServer and a running follower on it; `announce` is published (and fetched) first."""
    server = await WeightsTestServer().start()
    follower = WeightsFollower(
        client, KEYS, base_model_dir=write_base_model(tmp_path / "base"), out_dir=tmp_path / "weights",
        current_version=0, fetch_timeout_s=10, retry_base_s=0.05, retry_max_s=0.2, chunk_bytes=1024,
        max_message_bytes=64 << 20, metrics=metrics,
    )  # fmt: skip
    if announce is not None:
        await publish(client, server, announce)
    task = asyncio.create_task(follower.run())
    try:
        if announce is not None:
            assert await follower.wait_caught_up(10)
        yield server, follower
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()


async def publish(client, server: WeightsTestServer, version: int) -> None:
    server.versions[version] = tiny_state(version)
    await streams.append(client, KEYS.weights, server.notice(RUN, version))


async def test_a_version_re_announced_at_a_new_address_is_fetched_from_there(client, redis_url, tmp_path):
    """What a resumed learner does: it serves the same version again, from a new port."""
    old, new = await WeightsTestServer().start(), await WeightsTestServer().start()
    old.versions[1] = new.versions[1] = tiny_state(1)
    await streams.append(client, KEYS.weights, old.notice(RUN, 1))
    await old.stop()  # the learner that announced it is gone
    metrics = RolloutMetrics()
    follower = WeightsFollower(
        client, KEYS, base_model_dir=write_base_model(tmp_path / "base"), out_dir=tmp_path / "weights",
        current_version=0, fetch_timeout_s=5, retry_base_s=0.05, retry_max_s=0.2, chunk_bytes=1024,
        max_message_bytes=64 << 20, metrics=metrics,
    )  # fmt: skip
    task = asyncio.create_task(follower.run())
    try:
        await wait_until(lambda: follower.total_failures >= 2, what="failed fetches from the old address")
        await streams.append(client, KEYS.weights, new.notice(RUN, 1))
        assert await follower.wait_for_version(1, timeout_s=30), follower.last_error
        assert new.fetches == [1] and follower.target.endpoint == new.endpoint
        assert follower.take_ready().version == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await new.stop()


async def test_a_batch_waits_for_the_version_its_jobs_require_and_is_sampled_under_it(client, redis_url, tmp_path):
    metrics = RolloutMetrics()
    engine = FakeEngine()
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "old", min_policy_version=0)
    await add_jobs(client, "new", min_policy_version=1)  # same batch: the newest requirement wins
    async with following(client, tmp_path, metrics) as (server, follower):
        worker = make_worker(client, engine, make_settings(redis_url, version_wait_s=20), metrics, weights=follower)
        running = Running(worker)
        try:
            await wait_until(lambda: metrics.version_waits._value.get() == 1, what="the worker to wait for v1")
            await asyncio.sleep(0.1)
            assert engine.calls == [] and await groups_written(client) == []  # nothing sampled under v0
            await publish(client, server, 1)
            groups = await wait_until(lambda: _n_groups(client, 2), what="groups")
        finally:
            await running.stop()
    assert {g.job_id: g.policy_version for g in groups} == {"old": 1, "new": 1} and len(engine.calls) == 1
    assert engine.loads == [tmp_path / "weights" / "v1"] and worker.version == 1
    assert metrics.version_wait_timeouts._value.get() == 0 and metrics.version_wait_seconds._value.get() >= 0.1
    assert await pending(client) == 0


@pytest.mark.parametrize(("wait_s", "waits"), [(0.2, 1), (0, 0)], ids=["times-out", "disabled"])
async def test_a_version_that_does_not_come_is_waited_for_boundedly_then_sampled_without(
    client, redis_url, tmp_path, wait_s, waits
):
    metrics = RolloutMetrics()
    engine = FakeEngine()
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "j1", min_policy_version=3)
    async with following(client, tmp_path, metrics) as (_, follower):  # no version is ever announced
        worker = make_worker(client, engine, make_settings(redis_url, version_wait_s=wait_s), metrics, follower)
        running = Running(worker)
        (group,) = await wait_until(lambda: _n_groups(client, 1), what="the group")
        await running.stop()
    assert group.policy_version == 0 and await pending(client) == 0
    assert metrics.version_waits._value.get() == waits and metrics.version_wait_timeouts._value.get() == waits
    assert (metrics.version_wait_seconds._value.get() >= 0.2) == bool(waits)
    http = httpx.ASGITransport(app=create_app(RolloutState(client, metrics, RUN, "w1")))
    async with httpx.AsyncClient(transport=http, base_url="http://rollout") as c:
        text = (await c.get("/metrics")).text
    assert f"aisrl_rollout_version_wait_timeouts_total {float(waits)}" in text
    assert "aisrl_rollout_version_wait_seconds_total" in text and "aisrl_rollout_version_waits_total" in text


async def test_a_stop_while_waiting_for_a_version_releases_the_batch_unacked(client, redis_url, tmp_path):
    metrics = RolloutMetrics()
    engine = FakeEngine()
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "j1", "j2", min_policy_version=1)
    async with following(client, tmp_path, metrics) as (_, follower):
        worker = make_worker(client, engine, make_settings(redis_url, version_wait_s=60), metrics, weights=follower)
        running = Running(worker)
        await wait_until(lambda: metrics.version_waits._value.get() == 1, what="the worker to wait for v1")
        t0 = asyncio.get_running_loop().time()
        await running.stop()
        assert asyncio.get_running_loop().time() - t0 < 5  # the stop cut the 60 s wait short
    assert engine.calls == [] and await groups_written(client) == [] and await pending(client) == 2
    assert metrics.released._value.get() == 2 and metrics.version_wait_timeouts._value.get() == 0
    reclaimed = await streams.reclaim_idle(client, KEYS.prompts, GROUP, "next", 3_600_000, 10)
    assert len(reclaimed.entries) == 2  # released: immediately reclaimable by another replica


async def test_a_reload_that_breaks_the_engine_restores_the_last_good_version(client, redis_url, tmp_path):
    metrics = RolloutMetrics()
    engine = FakeEngine(break_on={"v2"})
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    async with following(client, tmp_path, metrics, announce=1) as (server, follower):
        worker = make_worker(client, engine, make_settings(redis_url), metrics, weights=follower)
        running = Running(worker)
        try:
            await add_jobs(client, "j1")
            await wait_until(lambda: _n_groups(client, 1), what="j1")
            await publish(client, server, 2)
            await wait_until(lambda: metrics.restores._value.get() == 1, what="the restore")
            await add_jobs(client, "j2")
            await wait_until(lambda: _n_groups(client, 2), what="j2")
            assert worker.version == 1 and engine.broken is None and follower.total_failures >= 1
            engine.break_on.clear()  # the follower fetches v2 again after its backoff; now it loads
            await wait_until(lambda: worker.version == 2, what="v2 loaded on a retry")
            await add_jobs(client, "j3")
            groups = {g.job_id: g for g in await wait_until(lambda: _n_groups(client, 3), what="j3")}
        finally:
            await running.stop()
    assert [groups[j].policy_version for j in ("j1", "j2", "j3")] == [1, 1, 2]
    v1, v2 = tmp_path / "weights" / "v1", tmp_path / "weights" / "v2"
    assert engine.attempts[:3] == [v1, v2, v1] and engine.loads[:2] == [v1, v1] and engine.loads[-1] == v2
    assert server.fetches.count(2) >= 2 and metrics.reloads._value.get() == 2 and await pending(client) == 0


async def test_a_broken_engine_that_cannot_be_restored_stops_the_worker_acking_nothing_unwritten(
    client, redis_url, tmp_path
):
    metrics = RolloutMetrics()
    base = write_base_model(tmp_path / "base")
    engine = FakeEngine(model_dir=base, break_on={"v1", "base"})  # version 0 is the base model's directory
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "j1")
    async with following(client, tmp_path, metrics) as (server, follower):
        worker = make_worker(client, engine, make_settings(redis_url, version_wait_s=20), metrics, weights=follower)
        running = Running(worker)
        await wait_until(lambda: _n_groups(client, 1), what="j1 at v0")
        await add_jobs(client, "j2", min_policy_version=1)
        await wait_until(lambda: metrics.version_waits._value.get() == 1, what="the worker to wait for v1")
        await publish(client, server, 1)
        with pytest.raises(EngineBroken, match=r"reloading version 0 from .*base failed too"):
            await asyncio.wait_for(running.task, timeout=30)
    assert engine.attempts == [tmp_path / "weights" / "v1", base] and len(engine.calls) == 1
    assert [g.job_id for g in await groups_written(client)] == ["j1"] and await dead_letters(client) == []
    assert await pending(client) == 1 and metrics.released._value.get() == 1  # j2: back for another replica
    assert metrics.restores._value.get() == 0


# ----------------------------------------------------------------------------- shutdown


async def test_cancelled_mid_batch_acks_nothing_and_releases_the_batch(client, redis_url):
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "j1", "j2")
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    worker = make_worker(client, engine, make_settings(redis_url))
    running = Running(worker)
    try:
        await wait_until(engine.entered.is_set, what="generating")
        running.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running.task
    finally:
        gate.set()
    assert await groups_written(client) == [] and await pending(client) == 2
    assert worker.metrics.released._value.get() == 2
    # Released, so another replica takes them over at once despite a long idle threshold.
    other = make_worker(client, FakeEngine(), make_settings(redis_url, worker_id="other", reclaim_idle_ms=3_600_000))
    other_run = Running(other)
    await wait_until(lambda: _n_groups(client, 2), what="groups by the other worker")
    await other_run.stop()
    assert count_of(await groups_written(client)) == Counter(["j1", "j2"]) and await pending(client) == 0


@pytest.mark.parametrize("finish", [True, False], ids=["finishes-batch", "grace-over-releases"])
async def test_sigterm_finishes_or_releases_the_batch_and_acks_nothing_unwritten(client, redis_url, tmp_path, finish):
    """A real replica process (fake engine) gets SIGTERM while a batch is generating."""
    await streams.ensure_group(client, KEYS.prompts, GROUP)
    await add_jobs(client, "j1", "j2")
    gate_file = tmp_path / "gate"
    settings = {"redis_url": redis_url, "run_id": RUN, "worker_id": "w-term", "http_port": 0, "block_ms": 50,
                "work_dir": str(tmp_path / "work"), "shutdown_grace_s": 30 if finish else 0.2}  # fmt: skip
    engine = {"gate_file": str(gate_file), "on_generate": "GENERATING"}
    proc = subprocess.Popen([sys.executable, SUPPORT, json.dumps(settings), json.dumps(engine)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        http_line = await asyncio.to_thread(read_until, proc, "rollout: HTTP", 500)
        port = int(http_line.split(":")[3].split()[0])
        await asyncio.to_thread(read_until, proc, "GENERATING", 500)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert (await http.get("/healthz")).json()["worker_id"] == "w-term"
            assert (await http.get("/readyz")).status_code == 200
            assert "aisrl_rollout_groups_total 0.0" in (await http.get("/metrics")).text
        proc.send_signal(signal.SIGTERM)
        if finish:
            await asyncio.sleep(0.2)  # the signal lands while the batch is still generating
        else:  # the grace period ends first: the batch is released while the engine call still runs
            await wait_until(lambda: _released(client, 2), what="the batch to be released")
        gate_file.touch()  # the engine call returns (its result is discarded when released); the process exits
        rc = await asyncio.to_thread(proc.wait, 30)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        gate_file.touch()
    assert rc == 0, output
    groups = await groups_written(client)
    if finish:
        assert count_of(groups) == Counter(["j1", "j2"]) and await pending(client) == 0
    else:
        assert groups == [] and await pending(client) == 2  # nothing acknowledged that was not written
        reclaimed = await streams.reclaim_idle(client, KEYS.prompts, GROUP, "next", 3_600_000, 10)
        assert len(reclaimed.entries) == 2  # released: immediately reclaimable
    assert not (tmp_path / "work" / "weights").exists() or not any((tmp_path / "work" / "weights").iterdir())


async def _released(client, n: int) -> bool:
    rows = await client.xpending_range(KEYS.prompts, GROUP, "-", "+", 10)
    return len(rows) == n and all(r["time_since_delivered"] > 10**9 for r in rows)


# ----------------------------------------------------------------------------- HTTP


async def test_health_readiness_and_metrics_over_http(client, redis_url):
    metrics = RolloutMetrics()
    state = RolloutState(client, metrics, RUN, "w1")
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://rollout") as http:
        assert (await http.get("/healthz")).json() == {"status": "ok", "worker_id": "w1"}
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["problems"] == ["engine not loaded yet"]
        state.set_engine_loaded(True)
        metrics.set_version(4)
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["policy_version"] == 4
        text = (await http.get("/metrics")).text
        names = (
            "aisrl_rollout_tokens_per_second", "aisrl_rollout_groups_per_second", "aisrl_rollout_policy_version 4.0",
            "aisrl_rollout_reload_seconds", "aisrl_rollout_reclaimed_total", "aisrl_rollout_dead_lettered_total",
            "aisrl_rollout_backpressure_waits_total", "aisrl_rollout_engine_loaded 1.0",
        )  # fmt: skip
        for name in names:
            assert name in text, name
    dead = async_client(f"redis://127.0.0.1:{free_port()}/0")
    state_down = RolloutState(dead, RolloutMetrics(), RUN, "w1", engine_loaded=True)
    transport = httpx.ASGITransport(app=create_app(state_down))
    async with httpx.AsyncClient(transport=transport, base_url="http://rollout") as http:
        reply = await http.get("/readyz")
        assert reply.status_code == 503 and "redis unavailable" in reply.json()["problems"][0]
    await dead.aclose()


# ----------------------------------------------------------------------------- the real engine


@pytest.mark.vllm
@pytest.mark.slow
async def test_worker_with_real_vllm_engine(client, redis_url, tmp_path):
    """The worker on vLLM (CPU, in-process engine core) over a tiny random model, at an emulated 4-bit
    scheme with an FP8 KV cache: groups with real token ids and finite logprobs, labelled with the scheme
    and KV cache the engine ran, and a weight version fetched over gRPC and reloaded into vLLM."""
    import torch

    from aisrl.models.tiny import TinyModelConfig, create_model, init_model_dir
    from aisrl.services.rollout.engine import EngineConfig
    from aisrl.services.rollout.vllm_engine import VllmEngine

    small = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    model_dir = init_model_dir(tmp_path / "model", small, seed=0)
    config = EngineConfig(
        in_process=True, kv_cache_gb=0.25, max_model_len=128, precision="mxfp4_w4a4", kv_cache_dtype="fp8"
    )
    engine = await asyncio.to_thread(VllmEngine, model_dir, config)
    server = await WeightsTestServer().start()
    metrics = RolloutMetrics()
    follower = WeightsFollower(
        client, KEYS, base_model_dir=model_dir, out_dir=tmp_path / "weights", current_version=0, fetch_timeout_s=60,
        retry_base_s=0.05, retry_max_s=0.2, chunk_bytes=1 << 20, max_message_bytes=64 << 20, metrics=metrics,
    )  # fmt: skip
    follower_task = asyncio.create_task(follower.run())
    worker = RolloutWorker(
        client, engine, make_settings(redis_url), metrics, tasks=get_echo_task, parse_problem=parse_echo_problem,
        model_id="tiny", weights=follower,
    )  # fmt: skip
    running = None
    try:
        await streams.ensure_group(client, KEYS.prompts, GROUP)
        running = Running(worker)
        await add_jobs(client, "v0-a", "v0-b", reference="12")
        groups = await wait_until(lambda: _n_groups(client, 2), timeout=120, what="groups from vLLM")
        for g in groups:
            assert g.policy_version == 0 and g.precision == common_pb2.PRECISION_MXFP4_W4A4_EMULATED
            assert g.kv_cache_dtype == common_pb2.KV_CACHE_DTYPE_FP8_E4M3 and len(g.samples) == 4
            for s in g.samples:
                ids = bytes_to_int32(s.completion_ids, "completion_ids")
                lp = bytes_to_float32(s.logprobs, "logprobs", expected=len(ids))
                assert 1 <= len(ids) <= 8 and np.all(np.isfinite(lp)) and np.all(lp <= 1e-4)
        new_state = {
            k: v.detach().to(torch.bfloat16).contiguous() for k, v in create_model(small, seed=1).state_dict().items()
        }
        server.versions[1] = new_state
        await streams.append(client, KEYS.weights, server.notice(RUN, 1))
        await wait_until(lambda: worker.version == 1, timeout=120, what="v1 loaded into vLLM")
        await add_jobs(client, "v1-a", reference="12")
        groups = await wait_until(lambda: _n_groups(client, 3), timeout=120, what="v1 group")
        assert groups[-1].job_id == "v1-a" and groups[-1].policy_version == 1
        assert metrics.reload_seconds._value.get() > 0
    finally:
        if running:
            await running.stop()
        follower_task.cancel()
        await asyncio.gather(follower_task, return_exceptions=True)
        await server.stop()
        await asyncio.to_thread(engine.close)
