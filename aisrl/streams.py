"""The run's Redis streams: key names, consumer groups, and the few operations every service needs.

Invariants:
- A source entry is acknowledged only in the same atomic step that appends its result (a
  trajectory group, a dead letter), and only while the caller still owns it (it is pending for
  that consumer). So a crash between "append" and "ack" cannot happen, and a slow consumer whose
  entry was reclaimed by another cannot append a duplicate: the loser's append is skipped.
  The step is one Lua script, not MULTI/EXEC, because MULTI/EXEC cannot make the append
  conditional on ownership of the pending entry; a script runs atomically just the same (no
  other client's command runs in between), and within it each ack follows its append.
- Releasing an entry (on shutdown) touches only entries the caller still owns, and leaves them
  pending, idle "since forever", so any live consumer reclaims them on its next pass.
- Every payload is one protobuf message in the field `pb` (PAYLOAD_FIELD).
- Redis counts a delivery on every read of a pending entry (a re-read by its owner after a
  restart, a takeover by XAUTOCLAIM), so that count says nothing about whether the entry harms
  its consumers. The `attempts` hash counts what does: per entry id, the attempts that began
  work on it and never ended (the consumer crashed or was killed while working on it).
- All of a run's keys share the hash tag `{run_id}`, so they live in one Redis Cluster slot and
  multi-key scripts work there too.

Pure helpers (key names, parsing of Redis replies, backlog arithmetic) are separate from the
async I/O functions, which take a `redis.asyncio.Redis` client (bytes responses).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from aisrl.v1 import rollout_pb2

PAYLOAD_FIELD = b"pb"
DEFAULT_PREFIX = "aisrl"
RUN_ID_PATTERN = r"^[A-Za-z0-9._-]{1,200}$"  # also the settings' run_id pattern: every run id is a valid key part
_RUN_ID = re.compile(RUN_ID_PATTERN)
# Upper bound on counting entries one by one (Redis < 7 has no lag in XINFO GROUPS).
DEFAULT_COUNT_CAP = 100_000


# ----------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class RunStreams:
    """Stream keys of one run, e.g. `aisrl:{run-1}:prompts`."""

    run_id: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"run_id must be 1-200 characters of [A-Za-z0-9._-], got {self.run_id!r}")
        if not self.prefix or any(c in self.prefix for c in "{}"):
            raise ValueError(f"prefix must be non-empty and without braces, got {self.prefix!r}")

    def key(self, name: str) -> str:
        return f"{self.prefix}:{{{self.run_id}}}:{name}"

    @property
    def prompts(self) -> str:
        return self.key("prompts")

    @property
    def trajectories(self) -> str:
        return self.key("trajectories")

    @property
    def weights(self) -> str:
        return self.key("weights")

    @property
    def deadletter(self) -> str:
        return self.key("deadletter")

    @property
    def attempts(self) -> str:
        """Hash: prompts entry id -> attempts that began work on it and did not end (see the module invariants)."""
        return self.key("attempts")


@dataclass(frozen=True)
class StreamEntry:
    """One stream entry. `payload` is None when the entry has no `pb` field (deleted, or foreign)."""

    id: str
    payload: bytes | None
    deliveries: int = 1


@dataclass(frozen=True)
class GroupInfo:
    """One consumer group as XINFO GROUPS reports it; `lag`/`entries_read` are None before Redis 7."""

    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    entries_read: int | None = None
    lag: int | None = None


@dataclass(frozen=True)
class Append:
    """Append `payload` to `stream` and acknowledge `source_id` (one result per source entry)."""

    source_id: str
    stream: str
    payload: bytes


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entries(raw: Sequence[Any] | None, deliveries: dict[str, int] | None = None) -> list[StreamEntry]:
    """[(id, {field: value}), ...] as redis-py returns them -> StreamEntry list.

    Entries whose id is None (Redis 6.2 XAUTOCLAIM answers a deleted entry with nil) are dropped;
    see `reclaim_idle` for how those are acknowledged.
    """
    out = []
    for item in raw or []:
        entry_id, fields = item[0], item[1]
        if entry_id is None:
            continue
        eid = _text(entry_id)
        payload = (fields or {}).get(PAYLOAD_FIELD)
        out.append(StreamEntry(eid, payload, (deliveries or {}).get(eid, 1)))
    return out


def parse_groups(raw: Sequence[dict[str, Any]]) -> list[GroupInfo]:
    """XINFO GROUPS reply -> GroupInfo list (Redis 6.2 has no `entries-read` and `lag`)."""
    groups = []
    for g in raw:
        lag = g.get("lag")
        read = g.get("entries-read")
        groups.append(
            GroupInfo(
                name=_text(g["name"]),
                consumers=int(g["consumers"]),
                pending=int(g["pending"]),
                last_delivered_id=_text(g["last-delivered-id"]),
                entries_read=None if read is None else int(read),
                lag=None if lag is None else int(lag),
            )
        )
    return groups


def unconsumed(length: int, groups: Sequence[tuple[int, int]]) -> int:
    """Entries some consumer group has not finished with: max over groups of (lag + pending).

    `groups` holds (lag, pending) per group. A stream nobody consumes yet has all its entries unconsumed.
    """
    if not groups:
        return length
    return max(lag + pending for lag, pending in groups)


def dead_letter(
    source_stream: str, message_id: str, reason: str, payload: bytes | None, worker_id: str, now: float
) -> rollout_pb2.DeadLetter:
    """The DeadLetter record of a source entry (its original payload kept for inspection)."""
    return rollout_pb2.DeadLetter(
        source_stream=source_stream,
        message_id=message_id,
        reason=reason,
        payload=payload or b"",
        worker_id=worker_id,
        created_unix=now,
    )


# ----------------------------------------------------------------------------- I/O

# KEYS[1]: source stream; KEYS[2..]: destination streams.
# ARGV: group, consumer, then (source_id, destination index into KEYS, payload) per append.
# Returns, per append, the new entry id, or "" when the source is no longer pending for consumer.
_APPEND_AND_ACK = """
local out = {}
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #owned == 1 then
    out[#out + 1] = redis.call('XADD', KEYS[tonumber(ARGV[i + 1])], '*', 'pb', ARGV[i + 2])
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    out[#out + 1] = ''
  end
end
return out
"""

# KEYS[1]: stream. ARGV: group, consumer, ids... Makes the consumer's own pending ids idle since
# the epoch (TIME 0) without counting a delivery (JUSTID), so any consumer reclaims them at once.
_RELEASE = """
local released = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'TIME', 0, 'JUSTID')
    released = released + 1
  end
end
return released
"""


async def ensure_group(client: aioredis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Creates the group (and the stream) if missing; True when it was created. Idempotent.

    start_id "0" makes a new group see entries written before it existed (no job is skipped
    because the first worker started after the learner).
    """
    try:
        await client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


async def append(client: aioredis.Redis, stream: str, payload: bytes, maxlen: int | None = None) -> str:
    """XADD one payload; with maxlen the stream is trimmed approximately to that length."""
    return _text(await client.xadd(stream, {PAYLOAD_FIELD: payload}, maxlen=maxlen, approximate=True))


async def read_new(
    client: aioredis.Redis, stream: str, group: str, consumer: str, count: int, block_ms: int | None
) -> list[StreamEntry]:
    """Never-delivered entries for this consumer (XREADGROUP >); block_ms None returns at once."""
    reply = await client.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    return parse_entries(reply[0][1]) if reply else []


async def read_own_pending(
    client: aioredis.Redis, stream: str, group: str, consumer: str, count: int
) -> list[StreamEntry]:
    """Entries already delivered to this consumer and not acknowledged (a restart with the same id)."""
    reply = await client.xreadgroup(group, consumer, {stream: "0"}, count=count)
    entries = parse_entries(reply[0][1]) if reply else []
    return await _with_deliveries(client, stream, group, consumer, entries)


async def _with_deliveries(
    client: aioredis.Redis, stream: str, group: str, consumer: str, entries: list[StreamEntry]
) -> list[StreamEntry]:
    if not entries:
        return entries
    ids = sorted(entries, key=lambda e: _id_key(e.id))
    rows = await client.xpending_range(
        stream, group, min=ids[0].id, max=ids[-1].id, count=len(entries) * 4 + 16, consumername=consumer
    )
    counts = {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}
    return [StreamEntry(e.id, e.payload, counts.get(e.id, e.deliveries)) for e in entries]


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Reclaimed:
    """Entries taken over from idle consumers, with delivery counts; `vanished`: ids acked because deleted."""

    entries: list[StreamEntry]
    vanished: int = 0


async def reclaim_idle(
    client: aioredis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
) -> Reclaimed:
    """Claims up to `count` entries pending longer than min_idle_ms for any consumer (XAUTOCLAIM).

    Entries deleted from the stream while pending can never be processed: Redis 7 drops them from
    the pending list itself; Redis 6.2 returns them as nil (without their id) and keeps them
    pending, so here the consumer's pending ids that no longer exist are acknowledged.
    """
    reply = await client.xautoclaim(stream, group, consumer, min_idle_ms, "0-0", count=count)
    raw = reply[1] if len(reply) > 1 else []
    entries = await _with_deliveries(client, stream, group, consumer, parse_entries(raw))
    vanished = 0
    if any(item[0] is None for item in raw):
        vanished = await _ack_vanished(client, stream, group, consumer, count)
    return Reclaimed(entries, vanished)


async def _ack_vanished(client: aioredis.Redis, stream: str, group: str, consumer: str, count: int) -> int:
    rows = await client.xpending_range(stream, group, min="-", max="+", count=count * 4 + 16, consumername=consumer)
    ids = [_text(r["message_id"]) for r in rows]
    if not ids:
        return 0
    async with client.pipeline(transaction=False) as pipe:
        for eid in ids:
            pipe.xrange(stream, min=eid, max=eid, count=1)
        found = await pipe.execute()
    missing = [eid for eid, hit in zip(ids, found, strict=True) if not hit]
    if missing:
        await client.xack(stream, group, *missing)
    return len(missing)


async def append_and_ack(
    client: aioredis.Redis, source_stream: str, group: str, consumer: str, appends: Sequence[Append]
) -> list[str | None]:
    """Atomically, per append: if source_id is still pending for consumer, XADD the payload and XACK it.

    Returns the new entry id per append, or None where the source was no longer ours (another
    consumer reclaimed it, or it was already acknowledged): nothing was appended for it.
    """
    if not appends:
        return []
    sources = [a.source_id for a in appends]
    if len(set(sources)) != len(sources):
        raise ValueError("append_and_ack: one append per source entry")
    streams = list(dict.fromkeys(a.stream for a in appends))
    keys = [source_stream, *streams]
    args: list[Any] = [group, consumer]
    for a in appends:
        args += [a.source_id, streams.index(a.stream) + 2, a.payload]
    result = await client.eval(_APPEND_AND_ACK, len(keys), *keys, *args)
    return [_text(r) or None for r in result]


async def send_to_dead_letter(
    client: aioredis.Redis,
    source_stream: str,
    group: str,
    consumer: str,
    deadletter_stream: str,
    entry: StreamEntry,
    reason: str,
    worker_id: str,
    now: float,
) -> str | None:
    """Atomically appends a DeadLetter for entry and acknowledges it (while still owned; else None)."""
    record = dead_letter(source_stream, entry.id, reason, entry.payload, worker_id, now)
    appended = await append_and_ack(
        client, source_stream, group, consumer, [Append(entry.id, deadletter_stream, record.SerializeToString())]
    )
    return appended[0]


async def unfinished_attempts(client: aioredis.Redis, key: str, ids: Sequence[str]) -> dict[str, int]:
    """Per entry id, the attempts that began and never ended (0 for none)."""
    if not ids:
        return {}
    values = await client.hmget(key, list(ids))
    return {eid: int(v or 0) for eid, v in zip(ids, values, strict=True)}


async def begin_attempts(client: aioredis.Redis, key: str, ids: Sequence[str]) -> None:
    """Records that work on these entries begins: a crash before `end_attempts` leaves it counted."""
    await _incr_each(client, key, ids, 1)


async def end_attempts(client: aioredis.Redis, key: str, ids: Sequence[str]) -> None:
    """Records that the work begun on these entries ended without a crash (whatever its outcome)."""
    await _incr_each(client, key, ids, -1)


async def forget_attempts(client: aioredis.Redis, key: str, ids: Sequence[str]) -> None:
    """Drops the records of entries that are resolved (acknowledged with their result or dead letter)."""
    if ids:
        await client.hdel(key, *ids)


async def _incr_each(client: aioredis.Redis, key: str, ids: Sequence[str], by: int) -> None:
    if not ids:
        return
    async with client.pipeline(transaction=False) as pipe:
        for eid in ids:
            pipe.hincrby(key, eid, by)
        await pipe.execute()


async def release(client: aioredis.Redis, stream: str, group: str, consumer: str, ids: Sequence[str]) -> int:
    """Hands the consumer's own unfinished entries back (see the module invariant); returns how many."""
    if not ids:
        return 0
    return int(await client.eval(_RELEASE, 1, stream, group, consumer, *ids))


async def ack(client: aioredis.Redis, stream: str, group: str, ids: Sequence[str]) -> int:
    """Plain XACK (for consumers that append nothing, e.g. the learner after a checkpoint)."""
    return int(await client.xack(stream, group, *ids)) if ids else 0


async def groups(client: aioredis.Redis, stream: str) -> list[GroupInfo]:
    """The stream's consumer groups ([] when the stream does not exist)."""
    try:
        return parse_groups(await client.xinfo_groups(stream))
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return []
        raise


async def count_after(client: aioredis.Redis, stream: str, after_id: str, cap: int = DEFAULT_COUNT_CAP) -> int:
    """Entries with an id greater than after_id, counted up to cap (XRANGE with an exclusive start)."""
    return len(await client.xrange(stream, min=f"({after_id}", max="+", count=cap))


async def group_lag(client: aioredis.Redis, stream: str, group: GroupInfo, cap: int = DEFAULT_COUNT_CAP) -> int:
    """Entries the group has not been delivered yet: XINFO's `lag` on Redis 7+; before that (or when
    Redis cannot compute it, after deletions) the entries after last-delivered-id, counted up to cap."""
    if group.lag is not None:
        return group.lag
    return await count_after(client, stream, group.last_delivered_id, cap)


async def backlog(client: aioredis.Redis, stream: str, cap: int = DEFAULT_COUNT_CAP) -> int:
    """Entries not yet consumed by the slowest group (lag + pending), or XLEN when no group exists.

    On Redis < 7 the lag part saturates at cap; pass the limit you compare against as cap.
    """
    found = await groups(client, stream)
    length = int(await client.xlen(stream)) if not found else 0
    per_group = [(await group_lag(client, stream, g, cap), g.pending) for g in found]
    return unconsumed(length, per_group)
