"""The learner with a real rollout worker (HF engine, FP8-emulated weights, the same tiny model) on a
real Redis and a real task (aisrl.tasks arithmetic): the prompt jobs the learner writes are accepted,
the groups the worker writes are trained on, the worker follows the versions the learner announces
and serves over gRPC, and the held-out evaluation runs on the task's eval split.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from learner_support import learner_settings, tiny_model

from aisrl import streams
from aisrl.redis_conn import async_client
from aisrl.services.learner.learner import Learner
from aisrl.services.learner.main import serve
from aisrl.services.rollout.config import RolloutSettings
from aisrl.services.rollout.main import serve as serve_rollout
from aisrl.v1 import rollout_pb2

pytestmark = pytest.mark.timeout(240)


async def test_learner_trains_on_a_real_rollout_worker_that_follows_its_weights(tmp_path, redis_url):
    model = tiny_model(tmp_path / "model")
    settings = learner_settings(
        tmp_path, redis_url, model, max_steps=4, checkpoint_every=2, max_staleness=1, task="arithmetic",
        task_options={"min_digits": 1, "max_digits": 2}, eval_every=4, eval_size=4, eval_samples=2,
    )  # fmt: skip
    learner = Learner(settings, redis_url)  # the task and problem source come from aisrl.tasks
    rollout_settings = RolloutSettings(
        redis_url=redis_url, run_id="t", model_path=str(model), engine="hf", precision="fp8", http_port=0,
        work_dir=str(tmp_path / "rollout"), batch_size=2, block_ms=50, catch_up_timeout_s=0, worker_id="w1",
    )  # fmt: skip
    stop_rollout = asyncio.Event()
    learner_ready = asyncio.Event()
    # transformers sets torch's process-wide default dtype while it builds a model, so two models of
    # different dtypes must not be loaded at the same time in one process: the worker starts once the
    # learner is up (in a deployment they are separate processes).
    training = asyncio.create_task(
        serve(settings, redis_url, learner=learner, install_signals=False, on_ready=lambda *_: learner_ready.set())
    )
    await asyncio.wait_for(learner_ready.wait(), timeout=60)
    rollout = asyncio.create_task(serve_rollout(rollout_settings, redis_url, stop=stop_rollout, install_signals=False))
    try:
        # A crashed worker must fail the test at once, not leave the learner waiting for groups.
        await asyncio.wait({training, rollout}, timeout=240, return_when=asyncio.FIRST_COMPLETED)
        assert training.done(), "the worker stopped first" if rollout.done() else "timed out"
        done = training.result()
    finally:
        stop_rollout.set()
        training.cancel()
        for task in (training, rollout):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=60)  # re-raises a worker crash
    assert done.step == 4 and done.version == 4
    assert done.last_eval is not None and done.last_eval.n_problems == 4
    client = async_client(redis_url)
    try:
        run = streams.RunStreams("t")
        assert await client.xlen(run.deadletter) == 0
        groups = [rollout_pb2.TrajectoryGroup.FromString(e.payload)
                  for e in streams.parse_entries(await client.xrange(run.trajectories))]  # fmt: skip
        assert {g.precision for g in groups} == {3}  # PRECISION_FP8_EMULATED
        assert {g.task for g in groups} == {"arithmetic"}
        assert max(g.policy_version for g in groups) >= 1, "the worker reloaded a version the learner announced"
    finally:
        await client.aclose()
