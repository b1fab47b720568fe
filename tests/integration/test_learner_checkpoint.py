"""Checkpoints and the acknowledgement rule, with kill drills on a real Redis.

A "kill" abandons the learner at a chosen point: nothing more is written to disk or Redis, exactly
what SIGKILL leaves behind (the durable state is Redis and the checkpoint directory). Trajectory
groups are hand-made (the rollout side is not under test).
"""

from __future__ import annotations

import pytest
import torch
from learner_support import learner_settings, make_group, put_groups, tiny_model, toy_source

from aisrl import streams
from aisrl.services.learner import checkpoint as ckpt
from aisrl.services.learner.learner import Learner

pytestmark = pytest.mark.timeout(240)

N_GROUPS = 10  # five steps of two groups


class Killed(BaseException):
    """Raised at the kill point; a BaseException, so nothing on the way out handles it."""


async def _learner(tmp_path, redis_url, **overrides) -> Learner:
    settings = learner_settings(tmp_path, redis_url, tmp_path / "model", max_staleness=100, **overrides)
    learner = Learner(settings, redis_url, task=object(), problem_source=toy_source)
    await learner.start()
    return learner


async def _pending(learner: Learner) -> set[str]:
    rows = await learner.client.xpending_range(learner.streams.trajectories, "learner", "-", "+", 100)
    return {r["message_id"].decode() for r in rows}


async def _delivered(learner: Learner, ids: list[str]) -> set[str]:
    [info] = await streams.groups(learner.client, learner.streams.trajectories)
    last = tuple(int(x) for x in info.last_delivered_id.split("-"))
    return {i for i in ids if tuple(int(x) for x in i.split("-")) <= last}


def _kill_at(learner: Learner, point: str) -> None:
    """Makes the learner die at `point` of its next step."""

    def boom(*args, **kwargs):
        raise Killed(point)

    async def aboom(*args, **kwargs):
        raise Killed(point)

    if point == "before_update":
        learner.trainer.update = boom
    elif point == "before_publish":
        learner._publish = aboom
    elif point == "before_checkpoint":
        learner.write_checkpoint = aboom
    elif point == "before_ack":
        learner.ack_used = aboom
    else:
        raise ValueError(point)


@pytest.mark.parametrize("point", ["before_update", "before_publish", "before_checkpoint", "before_ack"])
async def test_kill_at_any_point_loses_no_acked_work_and_trains_nothing_twice(tmp_path, redis_url, point):
    tiny_model(tmp_path / "model")
    first = await _learner(tmp_path, redis_url, checkpoint_every=2)
    ids = await put_groups(first.client, first.streams, [make_group("t", f"p{i}-a0", 0, i) for i in range(N_GROUPS)])
    trained: dict[int, list[str]] = {}  # step -> group ids, in the line of updates that survives
    for _ in range(3):  # steps 1, 2 (checkpoint, ack), 3
        record = await first.step_once()
        trained[record.step] = record.entry_ids
    _kill_at(first, point)
    with pytest.raises(Killed):
        await first.step_once()  # step 4: dies at `point`, around the checkpoint of step 4
    seen = {i for batch in trained.values() for i in batch}
    if first.step == 4:  # it did train step 4 before dying
        trained[4] = [i for i in first.used_unacked if i not in seen]
    acked_at_kill = await _delivered(first, ids) - await _pending(first)
    await first.abandon()

    second = await _learner(tmp_path, redis_url, checkpoint_every=2)
    restored = second.resumed_from
    # Acknowledged work is never lost: every acked group is in a checkpoint the learner restored.
    in_checkpoint = {i for step, batch in trained.items() if step <= restored for i in batch}
    if point == "before_ack":  # the checkpoint of step 4 is on disk: its groups are acked on resume
        assert restored == 4
    else:
        assert restored == 2
    assert acked_at_kill <= in_checkpoint
    lineage = [i for step, batch in sorted(trained.items()) if step <= restored for i in batch]
    while second.step < N_GROUPS // 2:
        record = await second.step_once()
        lineage += record.entry_ids
    await second.close()  # graceful: checkpoint and ack the rest
    assert sorted(lineage) == sorted(ids), "every group trained exactly once in the surviving line of updates"
    third = await _learner(tmp_path, redis_url)
    assert await _pending(third) == set() and third.step == N_GROUPS // 2
    await third.close()


async def test_resume_restores_step_version_optimizer_and_rng(tmp_path, redis_url):
    tiny_model(tmp_path / "model")
    first = await _learner(tmp_path, redis_url, checkpoint_every=2)
    await put_groups(first.client, first.streams, [make_group("t", f"p{i}-a0", 0, i) for i in range(6)])
    for _ in range(2):
        await first.step_once()
    state = {k: v.clone() for k, v in first.trainer.model.state_dict().items()}
    exp_avg = [first.trainer.optimizer.state[p]["exp_avg"].clone() for p in first.trainer.model.parameters()]
    rng = first.trainer.rng.bit_generator.state
    torch_rng = torch.get_rng_state().clone()
    await first.close()  # the checkpoint of step 2 is already on disk: nothing new to write

    torch.manual_seed(12345)  # a new process would start from another RNG state
    second = await _learner(tmp_path, redis_url, checkpoint_every=2)
    try:
        assert (second.step, second.version, second.resumed_from) == (2, 2, 2)
        assert all(torch.equal(v, state[k]) for k, v in second.trainer.model.state_dict().items())
        got = [second.trainer.optimizer.state[p]["exp_avg"] for p in second.trainer.model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(got, exp_avg, strict=True))
        assert second.trainer.rng.bit_generator.state == rng and torch.equal(torch.get_rng_state(), torch_rng)
        assert second.trainer.updates == 2 and second.gate.accepted == 4 and second.gate.running == 2
        record = await second.step_once()
        assert record.step == 3 and record.version == 3
    finally:
        await second.close()
    assert [s for s, _ in ckpt.list_checkpoints(second.checkpoint_dir)] == [2, 3]  # graceful stop checkpoints


async def test_versions_announced_after_the_checkpoint_are_not_reused(tmp_path, redis_url):
    tiny_model(tmp_path / "model")
    first = await _learner(tmp_path, redis_url, checkpoint_every=2)
    await put_groups(first.client, first.streams, [make_group("t", f"p{i}-a0", 0, i) for i in range(6)])
    for _ in range(3):
        await first.step_once()  # versions 1, 2, 3 announced; checkpoint at 2
    await first.abandon()
    second = await _learner(tmp_path, redis_url)
    try:
        assert (second.step, second.version) == (2, 4)  # restored weights of step 2, served as a new version
        assert second.store.latest.version == 4
    finally:
        await second.abandon()


async def test_a_crash_inside_a_step_is_not_checkpointed_on_the_way_out(tmp_path, redis_url):
    tiny_model(tmp_path / "model")
    learner = await _learner(tmp_path, redis_url, checkpoint_every=2)
    ids = await put_groups(learner.client, learner.streams, [make_group("t", f"p{i}-a0", 0, i) for i in range(6)])
    for _ in range(2):
        await learner.step_once()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the middle of the update")

    learner.trainer.update = broken
    with pytest.raises(RuntimeError):
        await learner.step_once()
    await learner.close()  # what serve() does after a crash
    assert [s for s, _ in ckpt.list_checkpoints(learner.checkpoint_dir)] == [2]
    again = await _learner(tmp_path, redis_url)
    try:
        assert await _pending(again) == set(ids[4:])  # the interrupted batch is still there, untrained
    finally:
        await again.abandon()
