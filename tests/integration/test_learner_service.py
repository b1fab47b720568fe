"""The learner as a service: serve() with its HTTP endpoints, the feeder, max_steps, SIGTERM.

A hand-made rollout responder plays the rollout side (these tests test the learner): it takes
prompt jobs through the rollout consumer group and answers each with a made-up trajectory group
tagged with the newest announced version, acknowledging the job atomically as real workers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import httpx
import pytest
from learner_support import ToyTask, learner_settings, make_group, put_groups, tiny_model, toy_source

from aisrl import streams
from aisrl.redis_conn import async_client
from aisrl.services.learner import checkpoint as ckpt
from aisrl.services.learner.learner import Learner
from aisrl.services.learner.main import serve
from aisrl.v1 import rollout_pb2, weights_pb2

pytestmark = pytest.mark.timeout(240)


async def _responder(redis_url: str, run: streams.RunStreams, seen_jobs: list[str]) -> None:
    client = async_client(redis_url)
    try:
        await streams.ensure_group(client, run.prompts, "rollout")
        while True:
            entries = await streams.read_new(client, run.prompts, "rollout", "w1", 4, 50)
            newest = streams.parse_entries(await client.xrevrange(run.weights, count=1))
            version = weights_pb2.WeightVersionNotice.FromString(newest[0].payload).version if newest else 0
            appends = []
            for e in entries:
                job = rollout_pb2.PromptJob.FromString(e.payload)
                seen_jobs.append(job.job_id)
                group = make_group(run.run_id, job.job_id, version, len(seen_jobs), group_size=job.group_size)
                appends.append(streams.Append(e.id, run.trajectories, group.SerializeToString()))
            await streams.append_and_ack(client, run.prompts, "rollout", "w1", appends)
    finally:
        await client.aclose()


async def test_serve_trains_to_max_steps_with_http_endpoints(tmp_path, redis_url):
    settings = learner_settings(
        tmp_path, redis_url, tiny_model(tmp_path / "model"), max_steps=4, checkpoint_every=3, eval_every=2,
        eval_size=4, eval_samples=2, compute_dtype="bfloat16",
    )  # fmt: skip
    learner = Learner(settings, redis_url, task=ToyTask(), problem_source=toy_source)
    jobs: list[str] = []
    rollout = asyncio.create_task(_responder(redis_url, learner.streams, jobs))
    answers: dict[str, httpx.Response] = {}
    ready = asyncio.Event()

    async def probe(port: int) -> None:
        await ready.wait()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for path in ("/healthz", "/readyz", "/status"):
                answers[path] = await http.get(path)
            while learner.last_eval is None:
                await asyncio.sleep(0.05)
            answers["/metrics"] = await http.get("/metrics")

    probes: list[asyncio.Task] = []

    def on_ready(_learner, port):
        probes.append(asyncio.create_task(probe(port)))
        ready.set()

    try:
        done = await asyncio.wait_for(serve(settings, redis_url, learner=learner, install_signals=False,
                                            on_ready=on_ready), timeout=120)  # fmt: skip
        await probes[0]
    finally:
        rollout.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rollout
    assert done.step == 4 and done.version == 4
    assert answers["/healthz"].status_code == 200 and answers["/readyz"].json()["status"] == "ready"
    metrics = answers["/metrics"].text
    for name in (
        "aisrl_learner_step",
        "aisrl_learner_alpha",
        "aisrl_learner_kl",
        "aisrl_learner_tokens_per_second",
        "aisrl_learner_stale_groups",
        "aisrl_learner_alpha_local",
        'aisrl_learner_accuracy{kind="greedy"}',
    ):
        assert name in metrics, name  # fmt: skip
    assert done.last_eval is not None and done.last_eval.n_problems == 4
    assert done.metrics.local_alpha.labels(reason="no_service")._value.get() == 4  # no service configured
    # Checkpoints at step 3 (every 3) and 4 (the stop); every trained group acknowledged.
    assert [s for s, _ in ckpt.list_checkpoints(done.checkpoint_dir)] == [3, 4]
    client = async_client(redis_url)
    try:
        pending = await client.xpending(learner.streams.trajectories, "learner")
        assert pending["pending"] == len(done.batcher.buffered_ids)  # read but unused: handed back, not acked
        # Admission: never more than (max_staleness + steps + 1) * batch_size jobs issued.
        assert len(jobs) <= (settings.max_staleness + 4 + 1) * settings.batch_size
        assert len({*jobs}) == len(jobs)
    finally:
        await client.aclose()


async def test_sigterm_checkpoints_and_hands_back_unused_groups(tmp_path, redis_url):
    settings = learner_settings(tmp_path, redis_url, tiny_model(tmp_path / "model"))
    learner = Learner(settings, redis_url, task=object(), problem_source=toy_source)

    def on_ready(ready_learner, _port):
        async def later():
            client, run = ready_learner.client, ready_learner.streams
            await put_groups(client, run, [make_group("t", "p0-a0", 0, 0)])
            while (await client.xpending(run.trajectories, "learner"))["pending"] != 1:  # read; a batch needs two
                await asyncio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)

        asyncio.get_running_loop().create_task(later())

    done = await asyncio.wait_for(serve(settings, redis_url, learner=learner, on_ready=on_ready), timeout=60)
    assert done.step == 0
    assert [s for s, _ in ckpt.list_checkpoints(done.checkpoint_dir)] == [0]
    client = async_client(redis_url)
    try:
        pending = await client.xpending(learner.streams.trajectories, "learner")
        assert pending["pending"] == 1  # handed back untrained: pending, not acknowledged
    finally:
        await client.aclose()


async def test_a_feeder_crash_stops_the_learner_instead_of_starving_it(tmp_path, redis_url):
    def broken_source(index: int) -> tuple[str, str]:
        raise ValueError(f"no problem {index}")

    settings = learner_settings(tmp_path, redis_url, tiny_model(tmp_path / "model"))
    learner = Learner(settings, redis_url, task=object(), problem_source=broken_source)
    await learner.start()
    try:
        with pytest.raises(ValueError, match="no problem 0"):
            await asyncio.wait_for(learner.run(asyncio.Event()), timeout=30)
        assert learner.gate.running == 0  # nothing was written, nothing counted
    finally:
        await learner.close()
