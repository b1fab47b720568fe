"""Writes prompt jobs to the run's prompts stream, admitted by the staleness gate.

Invariants:
- Problem index i is issued at most once as a new job: the XADD of its job and the move of the
  feeder's cursor past i happen in one MULTI/EXEC transaction, so a restart continues after the
  last job actually written (never re-issuing, never skipping an index).
- A job id names its problem index and attempt (`p<index>-a<attempt>`), so a stale group's prompt
  can be re-queued by regenerating the problem from (seed, index): nothing has to be remembered.
- A job's min_policy_version is the version current at its admission (its issued_version):
  rollout workers sample it under that version or newer, so it is not stale when trained.
- Jobs are admitted only through the gate (staleness.py); a re-queue replaces its job. A job a
  rollout worker dead-letters will never come back as a group: the feeder follows the run's
  dead-letter stream and frees its slot (`gate.on_rejected`), so the gate never leaks capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from aisrl import streams
from aisrl.logs import log_fields
from aisrl.services.learner.staleness import StalenessGate
from aisrl.v1 import rollout_pb2

log = logging.getLogger("aisrl.learner.feeder")

_JOB_ID = re.compile(r"^p(\d+)-a(\d+)$")
CURSOR_FIELD = "next_index"

# (index) -> (task name, problem JSON); the learner passes task.train_problem + problem_to_json.
ProblemSource = Callable[[int], tuple[str, str]]


@dataclass(frozen=True)
class JobSpec:
    """What every job of the run shares."""

    run_id: str
    group_size: int
    max_tokens: int
    temperature: float
    max_staleness: int
    seed: int


def job_id(index: int, attempt: int) -> str:
    return f"p{index}-a{attempt}"


def parse_job_id(value: str) -> tuple[int, int] | None:
    """(index, attempt) of a job id written by this feeder, else None."""
    match = _JOB_ID.match(value)
    return (int(match.group(1)), int(match.group(2))) if match else None


def job_seed(seed: int, index: int, attempt: int) -> int:
    return int(np.random.SeedSequence([seed, index, attempt]).generate_state(1, dtype=np.uint64)[0])


def make_job(
    spec: JobSpec, source: ProblemSource, index: int, attempt: int, version: int, now: float
) -> rollout_pb2.PromptJob:
    """The job of problem `index` (attempt `attempt`), admitted while the learner is at `version`."""
    task, problem_json = source(index)
    return rollout_pb2.PromptJob(
        run_id=spec.run_id,
        job_id=job_id(index, attempt),
        task=task,
        problem_json=problem_json,
        group_size=spec.group_size,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        # Admitted at `version`, the group is trained by version + max_staleness at the latest (staleness.py):
        # sampled at >= version it is never stale, so rollout workers wait for this version before sampling.
        min_policy_version=version,
        issued_version=version,
        seed=job_seed(spec.seed, index, attempt),
        created_unix=now,
    )


class Feeder:
    """Admits and writes jobs; `run` keeps the gate full until stopped."""

    def __init__(
        self,
        client: aioredis.Redis,
        run_streams: streams.RunStreams,
        spec: JobSpec,
        source: ProblemSource,
        gate: StalenessGate,
        current_step: Callable[[], int],
        current_version: Callable[[], int],
        poll_s: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.streams = run_streams
        self.spec = spec
        self.source = source
        self.gate = gate
        self.current_step = current_step
        self.current_version = current_version
        self.poll_s = poll_s
        self.clock = clock
        self.cursor_key = run_streams.key("learner:feeder")
        self.next_index = 0
        self.written = 0
        self.wake = asyncio.Event()  # set when the gate may have room (a step ended, a group was rejected)
        self.lost_jobs = 0  # jobs dead-lettered by rollout workers
        self._letters_after = "0-0"

    async def load_cursor(self, at_least: int = 0) -> int:
        """Reads the cursor (never below at_least); earlier dead letters are already in the re-seeded gate."""
        raw = await self.client.hget(self.cursor_key, CURSOR_FIELD)
        self.next_index = max(at_least, int(raw) if raw is not None else 0)
        newest = streams.parse_entries(await self.client.xrevrange(self.streams.deadletter, count=1))
        self._letters_after = newest[0].id if newest else "0-0"
        return self.next_index

    async def follow_dead_letters(self) -> int:
        """Frees the gate slot of every prompt job dead-lettered since the last call; returns how many."""
        reply = await self.client.xread({self.streams.deadletter: self._letters_after}, count=1000)
        entries = streams.parse_entries(reply[0][1]) if reply else []
        lost = 0
        for entry in entries:
            self._letters_after = entry.id
            try:
                letter = rollout_pb2.DeadLetter.FromString(entry.payload or b"")
            except DecodeError:
                continue  # not a dead letter: says nothing about our jobs
            if letter.source_stream == self.streams.prompts:
                lost += 1
        if lost:
            self.gate.on_rejected(lost)
            self.lost_jobs += lost
            log.warning("prompt jobs dead-lettered by rollout workers", extra=log_fields(count=lost))
        return lost

    async def feed_once(self) -> int:
        """Writes as many new jobs as the gate admits now; returns how many."""
        granted = self.gate.admit(self.current_step(), want=1 << 30)
        if granted == 0:
            return 0
        try:
            jobs = [
                make_job(self.spec, self.source, self.next_index + k, 0, self.current_version(), self.clock())
                for k in range(granted)
            ]
            async with self.client.pipeline(transaction=True) as pipe:
                for job in jobs:
                    pipe.xadd(self.streams.prompts, {streams.PAYLOAD_FIELD: job.SerializeToString()})
                pipe.hset(self.cursor_key, CURSOR_FIELD, self.next_index + granted)
                await pipe.execute()
        except BaseException:
            self.gate.running -= granted  # nothing was written
            raise
        self.next_index += granted
        self.written += granted
        log.debug("jobs written", extra=log_fields(count=granted, next_index=self.next_index))
        return granted

    def requeue_payload(self, old_job_id: str) -> bytes | None:
        """The job that re-queues old_job_id's problem (next attempt), or None for a foreign job id."""
        parsed = parse_job_id(old_job_id)
        if parsed is None:
            return None
        index, attempt = parsed
        job = make_job(self.spec, self.source, index, attempt + 1, self.current_version(), self.clock())
        return job.SerializeToString()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.follow_dead_letters()
            await self.feed_once()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.poll_s)
