"""The learner's batcher and feeder on a real Redis: stale groups counted and re-queued, bad groups
dead-lettered, the feeder's cursor kept across restarts. Trajectory groups are hand-made (these tests
test the learner, not the rollout workers)."""

from __future__ import annotations

import asyncio

import pytest
from learner_support import make_group, put_groups, toy_source

from aisrl import streams
from aisrl.services.learner.batcher import Batcher, BatcherConfig
from aisrl.services.learner.feeder import Feeder, JobSpec
from aisrl.services.learner.metrics import LearnerMetrics
from aisrl.services.learner.staleness import StalenessGate
from aisrl.v1 import rollout_pb2

pytestmark = pytest.mark.timeout(240)

RUN = streams.RunStreams("t")


async def _read(client, stream, message):
    return [message.FromString(e.payload) for e in streams.parse_entries(await client.xrange(stream))]


def _feeder(client, gate, step=0, version=0):
    spec = JobSpec("t", group_size=4, max_tokens=8, temperature=1.0, max_staleness=1, seed=0)
    return Feeder(client, RUN, spec, toy_source, gate, lambda: step, lambda: version)


def _batcher(client, gate, metrics, feeder, batch_size=2):
    config = BatcherConfig("t", "learner", "learner", batch_size=batch_size, max_staleness=1, block_ms=20)
    return Batcher(client, RUN, config, gate, metrics, feeder.requeue_payload)


async def test_stale_groups_are_counted_and_requeued(client):
    gate, metrics = StalenessGate(2, 1, running=4), LearnerMetrics()
    feeder = _feeder(client, gate, version=5)
    batcher = _batcher(client, gate, metrics, feeder)
    await batcher.start()
    # Version 5, max_staleness 1: groups of version 3 and 2 are stale, 4 and 5 are fresh.
    groups = [make_group("t", "p0-a0", 3, 0), make_group("t", "p1-a0", 4, 1), make_group("t", "p2-a2", 2, 2),
              make_group("t", "p3-a0", 5, 3)]  # fmt: skip
    ids = await put_groups(client, RUN, groups)
    batch = await batcher.next_batch(version=5, stop=asyncio.Event())
    assert [g.entry_id for g in batch.groups] == [ids[1], ids[3]]
    assert batch.stale == 2 and batch.staleness == [1, 0]
    assert metrics.stale_groups._value.get() == 2
    # Re-queued as the next attempt of the same problem, issued at the current version ...
    jobs = [
        rollout_pb2.PromptJob.FromString(e.payload) for e in streams.parse_entries(await client.xrange(RUN.prompts))
    ]
    assert [(j.job_id, j.problem_json, j.issued_version) for j in jobs] == [
        ("p0-a1", '{"index": 0}', 5),
        ("p2-a3", '{"index": 2}', 5),
    ]
    # ... and the stale groups are acknowledged; the trained ones stay pending until a checkpoint.
    pending = {r["message_id"].decode() for r in await client.xpending_range(RUN.trajectories, "learner", "-", "+", 10)}
    assert pending == {ids[1], ids[3]}
    # The gate: two groups accepted, the two re-queued jobs still running.
    assert (gate.accepted, gate.running) == (2, 2)


async def test_a_group_going_stale_in_the_buffer_is_requeued_at_batch_time(client):
    gate, metrics = StalenessGate(1, 1, running=2), LearnerMetrics()
    feeder = _feeder(client, gate)
    batcher = _batcher(client, gate, metrics, feeder, batch_size=1)
    await batcher.start()
    await put_groups(client, RUN, [make_group("t", "p0-a0", 0, 0), make_group("t", "p1-a0", 0, 1)])
    first = await batcher.next_batch(version=0, stop=asyncio.Event())
    assert len(first.groups) == 1 and len(batcher.buffer) <= 1
    await put_groups(client, RUN, [make_group("t", "p2-a0", 2, 2)])
    second = await batcher.next_batch(version=2, stop=asyncio.Event())  # two versions later: p1 is stale now
    assert [g.job_id for g in second.groups] == ["p2-a0"] and second.stale == 1


async def test_bad_and_foreign_groups_are_dead_lettered(client):
    gate, metrics = StalenessGate(1, 0, running=3), LearnerMetrics()
    batcher = _batcher(client, gate, metrics, _feeder(client, gate), batch_size=1)
    await batcher.start()
    broken = make_group("t", "p0-a0", 0, 0)
    broken.samples[0].logprobs = b"\x00\x00\xc0\x7f" * (len(broken.samples[0].completion_ids) // 4)  # NaN
    foreign_stale = make_group("t", "someone-else", 0, 1)
    await put_groups(client, RUN, [broken, foreign_stale])
    await client.xadd(RUN.trajectories, {b"other": b"x"})
    await put_groups(client, RUN, [make_group("t", "p2-a0", 2, 2)])
    batch = await batcher.next_batch(version=2, stop=asyncio.Event())
    assert [g.job_id for g in batch.groups] == ["p2-a0"]
    letters = [
        rollout_pb2.DeadLetter.FromString(e.payload) for e in streams.parse_entries(await client.xrange(RUN.deadletter))
    ]
    reasons = sorted(letter.reason.split(":")[0] for letter in letters)
    assert len(letters) == 3 and any("not a log-probability" in r for r in (x.reason for x in letters)), reasons
    assert any("cannot be re-queued" in x.reason for x in letters)
    assert gate.running == 0  # every rejected job freed its slot (the trained one moved to accepted)


async def test_feeder_admits_by_the_gate_and_resumes_after_its_last_written_job(client):
    gate = StalenessGate(batch_size=2, max_staleness=1)
    feeder = _feeder(client, gate)
    await feeder.load_cursor()
    assert await feeder.feed_once() == 4 and await feeder.feed_once() == 0  # (1 + 0 + 1) * 2
    again = _feeder(client, StalenessGate(2, 1, accepted=4))  # a restarted learner, one step later
    assert await again.load_cursor() == 4
    again.current_step = lambda: 1
    assert await again.feed_once() == 2
    jobs = [
        rollout_pb2.PromptJob.FromString(e.payload) for e in streams.parse_entries(await client.xrange(RUN.prompts))
    ]
    assert [j.job_id for j in jobs] == [f"p{i}-a0" for i in range(6)]  # no index issued twice, none skipped


async def test_jobs_dead_lettered_by_rollout_workers_free_their_slot(client):
    gate = StalenessGate(batch_size=2, max_staleness=0)
    feeder = _feeder(client, gate)
    await client.xadd(RUN.deadletter, {b"pb": b"old"})  # before the (re)start: already in the re-seeded gate
    await feeder.load_cursor()
    assert await feeder.feed_once() == 2 and gate.capacity(0) == 0
    letter = streams.dead_letter(RUN.prompts, "1-0", "verifier failed", b"", "w1", 0.0)
    await streams.append(client, RUN.deadletter, letter.SerializeToString())
    learner_letter = streams.dead_letter(RUN.trajectories, "2-0", "NaN", b"", "learner", 0.0)  # counted by the batcher
    await streams.append(client, RUN.deadletter, learner_letter.SerializeToString())
    assert await feeder.follow_dead_letters() == 1 and gate.capacity(0) == 1
    assert await feeder.follow_dead_letters() == 0


async def test_own_idle_entries_returned_by_xautoclaim_are_not_taken_twice(client):
    """Groups trained and awaiting their checkpoint can idle past reclaim_idle_ms: XAUTOCLAIM returns them."""
    gate, metrics = StalenessGate(2, 5, running=4), LearnerMetrics()
    config = BatcherConfig("t", "learner", "learner", batch_size=2, max_staleness=5, block_ms=20, reclaim_idle_ms=1)
    batcher = Batcher(client, RUN, config, gate, metrics, _feeder(client, gate).requeue_payload)
    await batcher.start()
    ids = await put_groups(client, RUN, [make_group("t", f"p{i}-a0", 0, i) for i in range(2)])
    first = await batcher.next_batch(version=0, stop=asyncio.Event())
    await asyncio.sleep(0.05)  # the first batch (not acked: no checkpoint yet) is now idle
    later = await put_groups(client, RUN, [make_group("t", f"p{i}-a0", 0, i) for i in range(2, 4)])
    batcher._next_reclaim = 0.0  # reclaim on this read
    second = await batcher.next_batch(version=0, stop=asyncio.Event())
    assert [g.entry_id for g in first.groups] == ids and [g.entry_id for g in second.groups] == later
