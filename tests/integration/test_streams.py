"""The shared Redis stream transport (aisrl.streams) against a real (embedded, 6.2) Redis."""

from __future__ import annotations

import asyncio

import pytest

from aisrl import streams
from aisrl.v1 import rollout_pb2

G = "workers"


@pytest.fixture
def keys() -> streams.RunStreams:
    return streams.RunStreams("run-1")


def test_keys_share_the_run_hash_tag():
    keys = streams.RunStreams("run.7_a", prefix="x")
    assert keys.prompts == "x:{run.7_a}:prompts"
    assert {keys.trajectories, keys.weights, keys.deadletter} == {
        "x:{run.7_a}:trajectories", "x:{run.7_a}:weights", "x:{run.7_a}:deadletter",
    }  # fmt: skip
    for bad in ("", "a b", "a:{b}", "x" * 201):
        with pytest.raises(ValueError, match="run_id"):
            streams.RunStreams(bad)


def test_pure_helpers():
    raw = [(b"1-0", {b"pb": b"a"}), (None, None), (b"2-0", {b"other": b"x"})]
    assert streams.parse_entries(raw, {"1-0": 3}) == [
        streams.StreamEntry("1-0", b"a", 3), streams.StreamEntry("2-0", None, 1),
    ]  # fmt: skip
    redis7 = [{"name": b"g", "consumers": 1, "pending": 2, "last-delivered-id": b"5-0", "entries-read": 5, "lag": 3}]
    assert streams.parse_groups(redis7) == [streams.GroupInfo("g", 1, 2, "5-0", 5, 3)]
    assert streams.unconsumed(10, []) == 10
    assert streams.unconsumed(10, [(3, 2), (0, 1)]) == 5


async def test_group_creation_is_idempotent_and_sees_older_entries(client, keys):
    await streams.append(client, keys.prompts, b"early")
    assert await streams.ensure_group(client, keys.prompts, G) is True
    assert await streams.ensure_group(client, keys.prompts, G) is False
    assert await streams.ensure_group(client, keys.trajectories, G) is True  # MKSTREAM
    got = await streams.read_new(client, keys.prompts, G, "a", count=10, block_ms=None)
    assert [e.payload for e in got] == [b"early"]


async def test_consumers_share_work_without_duplicates(client, keys):
    await streams.ensure_group(client, keys.prompts, G)
    for i in range(10):
        await streams.append(client, keys.prompts, b"%d" % i)
    a = await streams.read_new(client, keys.prompts, G, "a", count=4, block_ms=None)
    b = await streams.read_new(client, keys.prompts, G, "b", count=100, block_ms=None)
    assert len(a) == 4 and len(b) == 6
    assert {e.payload for e in a}.isdisjoint({e.payload for e in b})
    assert await streams.read_new(client, keys.prompts, G, "c", count=10, block_ms=20) == []


async def test_append_and_ack_only_while_owned(client, keys):
    await streams.ensure_group(client, keys.prompts, G)
    for i in range(3):
        await streams.append(client, keys.prompts, b"job%d" % i)
    j0, j1, j2 = await streams.read_new(client, keys.prompts, G, "a", count=3, block_ms=None)
    # b takes j1 over (a looked dead); a's late result for j1 must not be appended.
    await client.xclaim(keys.prompts, G, "b", 0, [j1.id])
    result = await streams.append_and_ack(client, keys.prompts, G, "a", [
        streams.Append(j0.id, keys.trajectories, b"group0"),
        streams.Append(j1.id, keys.trajectories, b"group1"),
        streams.Append(j2.id, keys.deadletter, b"dead2"),
    ])  # fmt: skip
    assert result[0] and result[1] is None and result[2]
    assert [f[b"pb"] for _, f in await client.xrange(keys.trajectories)] == [b"group0"]
    assert [f[b"pb"] for _, f in await client.xrange(keys.deadletter)] == [b"dead2"]
    pending = await client.xpending_range(keys.prompts, G, "-", "+", 10)
    assert [(p["message_id"].decode(), p["consumer"]) for p in pending] == [(j1.id, b"b")]
    # Acknowledged means gone from the pending list: a second write of the same job appends nothing.
    assert await streams.append_and_ack(
        client, keys.prompts, G, "a", [streams.Append(j0.id, keys.trajectories, b"x")]
    ) == [None]
    with pytest.raises(ValueError, match="one append per source"):
        await streams.append_and_ack(client, keys.prompts, G, "b", [streams.Append(j1.id, keys.trajectories, b"")] * 2)


async def test_dead_letter_records_the_reason_and_acks(client, keys):
    await streams.ensure_group(client, keys.prompts, G)
    await streams.append(client, keys.prompts, b"\xff garbage")
    (entry,) = await streams.read_new(client, keys.prompts, G, "a", count=1, block_ms=None)
    new_id = await streams.send_to_dead_letter(
        client, keys.prompts, G, "a", keys.deadletter, entry, "bad protobuf", "w1", 5.0
    )
    assert new_id
    ((_, fields),) = await client.xrange(keys.deadletter)
    record = rollout_pb2.DeadLetter.FromString(fields[b"pb"])
    assert (record.source_stream, record.message_id, record.reason, record.payload, record.worker_id) == (
        keys.prompts, entry.id, "bad protobuf", b"\xff garbage", "w1",
    )  # fmt: skip
    assert (await client.xpending(keys.prompts, G))["pending"] == 0


async def test_reclaim_idle_counts_deliveries_and_acks_deleted_entries(client, keys):
    await streams.ensure_group(client, keys.prompts, G)
    for i in range(3):
        await streams.append(client, keys.prompts, b"%d" % i)
    e0, e1, e2 = await streams.read_new(client, keys.prompts, G, "dead", count=3, block_ms=None)
    assert (await streams.reclaim_idle(client, keys.prompts, G, "alive", 60_000, 10)).entries == []  # not idle yet
    await client.xdel(keys.prompts, e2.id)  # e.g. trimmed while pending: can never be processed
    await asyncio.sleep(0.03)
    got = await streams.reclaim_idle(client, keys.prompts, G, "alive", 20, 10)
    assert [(e.id, e.payload, e.deliveries) for e in got.entries] == [(e0.id, b"0", 2), (e1.id, b"1", 2)]
    assert got.vanished == 1
    pending = await client.xpending_range(keys.prompts, G, "-", "+", 10)
    assert {(p["message_id"].decode(), p["consumer"]) for p in pending} == {(e0.id, b"alive"), (e1.id, b"alive")}


async def test_release_hands_back_only_own_entries_immediately(client, keys):
    await streams.ensure_group(client, keys.prompts, G)
    for i in range(2):
        await streams.append(client, keys.prompts, b"%d" % i)
    (mine,) = await streams.read_new(client, keys.prompts, G, "me", count=1, block_ms=None)
    (theirs,) = await streams.read_new(client, keys.prompts, G, "other", count=1, block_ms=None)
    assert await streams.release(client, keys.prompts, G, "me", [mine.id, theirs.id]) == 1
    # Released entries are idle "since forever": reclaimable at once even with a long min-idle.
    got = await streams.reclaim_idle(client, keys.prompts, G, "survivor", 3_600_000, 10)
    assert [e.id for e in got.entries] == [mine.id]
    assert got.entries[0].deliveries == 2  # the release itself counted no delivery


async def test_backlog_without_and_with_consumer_groups(client, keys):
    assert await streams.backlog(client, keys.trajectories) == 0  # no stream yet
    for i in range(5):
        await streams.append(client, keys.trajectories, b"%d" % i)
    assert await streams.backlog(client, keys.trajectories) == 5  # nobody consumes yet: XLEN
    await streams.ensure_group(client, keys.trajectories, "learner")
    assert await streams.backlog(client, keys.trajectories) == 5  # all undelivered (lag)
    read = await streams.read_new(client, keys.trajectories, "learner", "l", count=3, block_ms=None)
    assert await streams.backlog(client, keys.trajectories) == 5  # 2 undelivered + 3 pending
    await streams.ack(client, keys.trajectories, "learner", [e.id for e in read[:2]])
    assert await streams.backlog(client, keys.trajectories) == 3
    assert await streams.backlog(client, keys.trajectories, cap=1) == 2  # lag counted up to the cap, + 1 pending
    (group,) = await streams.groups(client, keys.trajectories)
    assert group.lag is None  # Redis 6.2: computed from last-delivered-id instead
    assert await streams.group_lag(client, keys.trajectories, group) == 2
