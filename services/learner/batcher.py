"""Reads trajectory groups through the learner's consumer group until it has a batch.

Invariants:
- Every entry read is resolved exactly one way: trained on (it joins a batch; it is acknowledged
  later, only once a checkpoint includes its update: see learner.py), dead-lettered (it cannot be
  trained on; the dead letter is appended and the entry acknowledged in one atomic step), or
  re-queued (stale: a new job for the same problem is appended to the prompts stream and the
  entry acknowledged in one atomic step). Nothing is dropped silently: rejections are counted
  and logged.
- Staleness is judged when a group joins a batch, against the version the batch trains at:
  a group sampled more than max_staleness versions ago is not trained on.
- After a restart (same consumer name) the learner's own pending groups are read first, then new
  ones; groups pending on another, dead consumer of the group are taken over after reclaim_idle_ms.
- An entry the learner holds (buffered, in a batch, or trained and awaiting its checkpoint) is
  never taken again: XAUTOCLAIM also returns the learner's own long-idle entries, and those are
  skipped (`held`), so a slow checkpoint cadence cannot make a group be trained twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from aisrl import streams
from aisrl.logs import log_fields
from aisrl.services.learner.groups import Group, InvalidGroup, decode_group, group_staleness, parse_group
from aisrl.services.learner.metrics import LearnerMetrics
from aisrl.services.learner.staleness import StalenessGate

log = logging.getLogger("aisrl.learner.batcher")


@dataclass(frozen=True)
class BatcherConfig:
    run_id: str
    consumer_group: str
    consumer_name: str
    batch_size: int
    max_staleness: int
    block_ms: int = 500
    reclaim_idle_ms: int = 600_000
    vocab_size: int | None = None
    max_length: int | None = None


@dataclass
class Batch:
    groups: list[Group]
    stale: int = 0  # groups re-queued while this batch was formed
    staleness: list[int] = field(default_factory=list)  # per trained group


async def read_own_pending_after(
    client: aioredis.Redis, stream: str, group: str, consumer: str, after_id: str, count: int
) -> list[streams.StreamEntry]:
    """This consumer's pending entries with ids after after_id (pages through the pending list;
    `aisrl.streams.read_own_pending` always starts at the beginning)."""
    reply = await client.xreadgroup(group, consumer, {stream: after_id}, count=count)
    return streams.parse_entries(reply[0][1]) if reply else []


class Batcher:
    def __init__(
        self,
        client: aioredis.Redis,
        run_streams: streams.RunStreams,
        config: BatcherConfig,
        gate: StalenessGate,
        metrics: LearnerMetrics,
        requeue_payload: Callable[[str], bytes | None],
        on_rejected: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.streams = run_streams
        self.config = config
        self.gate = gate
        self.metrics = metrics
        self.requeue_payload = requeue_payload
        self.on_rejected = on_rejected
        self.buffer: deque[Group] = deque()
        self.held: set[str] = set()  # entries handed out or buffered, until acked or resolved (`forget`)
        self._own_cursor: str | None = "0"  # None once the own pending list is exhausted
        self._next_reclaim = 0.0

    async def start(self) -> None:
        await streams.ensure_group(self.client, self.streams.trajectories, self.config.consumer_group)

    @property
    def buffered_ids(self) -> list[str]:
        return [g.entry_id for g in self.buffer]

    def forget(self, ids: list[str]) -> None:
        """The learner acknowledged these entries: they are no longer held."""
        self.held.difference_update(ids)

    async def next_batch(self, version: int, stop: asyncio.Event) -> Batch | None:
        """batch_size fresh groups for training at `version`, or None when stopped first."""
        batch = Batch([])
        while len(batch.groups) < self.config.batch_size:
            while self.buffer and len(batch.groups) < self.config.batch_size:
                group = self.buffer.popleft()
                lag = group_staleness(version, group.policy_version)
                if lag > self.config.max_staleness:
                    await self._requeue(group, lag, version)
                    batch.stale += 1
                    continue
                batch.groups.append(group)
                batch.staleness.append(lag)
                self.gate.on_accepted()
                self.metrics.staleness.observe(lag)
            if len(batch.groups) == self.config.batch_size:
                break
            if stop.is_set():
                self.buffer.extendleft(reversed(batch.groups))  # hand back, in order
                self.gate.running += len(batch.groups)
                self.gate.accepted -= len(batch.groups)
                return None
            await self._fill(self.config.batch_size - len(batch.groups))
        return batch

    async def _fill(self, want: int) -> None:
        entries = await self._read(want)
        for entry in entries:
            if entry.id in self.held:
                continue  # our own idle entry, returned by XAUTOCLAIM: already in use
            try:
                pb = parse_group(entry.payload, self.config.run_id)
                group = decode_group(entry.id, pb, self.config.vocab_size, self.config.max_length)
            except InvalidGroup as exc:
                await self._dead_letter(entry, exc)
                continue
            self.metrics.rounded_logprobs.inc(group.rounded)
            self.buffer.append(group)
            self.held.add(entry.id)

    async def _read(self, want: int) -> list[streams.StreamEntry]:
        cfg, stream = self.config, self.streams.trajectories
        if self._own_cursor is not None:
            own = await read_own_pending_after(
                self.client, stream, cfg.consumer_group, cfg.consumer_name, self._own_cursor, want
            )
            if own:
                self._own_cursor = own[-1].id
                log.info("re-reading own pending groups", extra=log_fields(count=len(own)))
                return own
            self._own_cursor = None
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(1.0, cfg.reclaim_idle_ms / 2000)
            taken = await streams.reclaim_idle(
                self.client, stream, cfg.consumer_group, cfg.consumer_name, cfg.reclaim_idle_ms, want
            )
            if taken.entries:
                log.warning("took over groups from an idle consumer", extra=log_fields(count=len(taken.entries)))
                return taken.entries
        return await streams.read_new(self.client, stream, cfg.consumer_group, cfg.consumer_name, want, cfg.block_ms)

    async def _dead_letter(self, entry: streams.StreamEntry, exc: InvalidGroup) -> None:
        letter = streams.dead_letter(
            self.streams.trajectories, entry.id, exc.reason, entry.payload, self.config.consumer_name, time.time()
        )
        append = streams.Append(entry.id, self.streams.deadletter, letter.SerializeToString())
        [written] = await streams.append_and_ack(
            self.client, self.streams.trajectories, self.config.consumer_group, self.config.consumer_name, [append]
        )
        if written is not None:
            self.gate.on_rejected()
            self.on_rejected()
            self.metrics.dead_lettered.labels(kind=exc.kind).inc()
        log.warning("group dead-lettered", extra=log_fields(entry=entry.id, kind=exc.kind, reason=exc.reason))

    async def _requeue(self, group: Group, lag: int, version: int) -> None:
        payload = self.requeue_payload(group.job_id)
        cfg = self.config
        if payload is None:  # not one of our jobs: it cannot be regenerated
            reason = (
                f"stale by {lag} versions (max {cfg.max_staleness}) and job id {group.job_id!r} cannot be re-queued"
            )
            await self._dead_letter(streams.StreamEntry(group.entry_id, None), InvalidGroup("stale", reason))
            return
        append = streams.Append(group.entry_id, self.streams.prompts, payload)
        [written] = await streams.append_and_ack(
            self.client, self.streams.trajectories, cfg.consumer_group, cfg.consumer_name, [append]
        )
        self.held.discard(group.entry_id)
        if written is not None:
            self.metrics.stale_groups.inc()  # the gate is unchanged: the new job replaces the old one
        log.warning(
            "stale group not trained on; prompt re-queued",
            extra=log_fields(entry=group.entry_id, job=group.job_id, group_version=group.policy_version,
                             version=version, staleness=lag, requeued=written is not None),
        )  # fmt: skip
