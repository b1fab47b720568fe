"""The rollout loop: prompt jobs in, one scored TrajectoryGroup per job out.

Invariants:
- A job is acknowledged only in the atomic step that writes its group or its dead letter, and
  only while this worker still owns it (`aisrl.streams.append_and_ack`): a crash at any point
  loses no job and duplicates no group; a job this worker was too slow for (reclaimed by
  another) is dropped here, not written twice.
- Every group is sampled under one policy version: weights are swapped only between batches,
  and the version is read once per batch.
- A batch is sampled under at least the newest `min_policy_version` of its jobs whenever the
  weights follower gets that version within `version_wait_s` (otherwise under the loaded one,
  counted and logged): a group sampled under an older version would be trained too stale.
- The engine never samples while broken: a reload that fails part-way is followed by a reload of
  the last good version's directory; if that fails too, the worker raises `EngineBroken` (fatal).
- A job that cannot be used (undecodable, wrong run, unknown task, bad problem, bad sizes, a prompt
  or sampling parameters the engine refuses, broken logprobs, a failing verifier, crashing
  workers) is dead-lettered with its reason; the worker keeps running. Prompts are checked against
  the engine's limits before sampling; a batch the engine still fails is sampled job by job, so the
  other jobs of the batch are sampled, never dead-lettered with the culprit.
  Logprobs are never repaired or replaced by zeros.
- Crashing workers means: `max_deliveries` attempts to sample the job began and never ended
  (streams' `attempts` hash). Re-reads after a restart and takeovers, which Redis counts as
  deliveries, do not count; nor does a stop (the attempt ends when the batch is cancelled).
- Nothing is read while the trajectories backlog is at its limit (backpressure).
- On stop, the current batch is finished; a batch read after the stop, or interrupted
  (cancelled, crashed), is released (left pending, immediately reclaimable), never acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from aisrl import streams
from aisrl.logs import log_fields
from aisrl.services.rollout.config import RolloutSettings
from aisrl.services.rollout.engine import (
    Completion,
    PromptRejected,
    RolloutEngine,
    RolloutLogprobError,
    SamplingConfig,
    check_logprobs,
)
from aisrl.services.rollout.labels import PrecisionLabel
from aisrl.services.rollout.metrics import RolloutMetrics
from aisrl.v1 import rollout_pb2
from aisrl.wire.arrays import float32_to_bytes, int32_to_bytes

log = logging.getLogger("aisrl.rollout")
# What an engine raises for one job's request (PromptRejected, RolloutLogprobError and other ValueErrors):
# sampled alone and still failing, the job is dead-lettered. Anything else is the engine's trouble.
JOB_ERRORS = (ValueError,)
T = TypeVar("T")


class Problem(Protocol):
    task: str
    uid: str
    prompt: str


class Task(Protocol):
    def verify(self, problem: Any, completion_text: str) -> float: ...


class WeightSource(Protocol):
    """What the worker needs from the weights follower (weights_client.WeightsFollower)."""

    def take_ready(self) -> Any: ...
    def loaded(self, fetched: Any) -> None: ...
    def reload_failed(self, fetched: Any, error: BaseException) -> None: ...
    async def wait_for_version(self, version: int, timeout_s: float) -> bool: ...


class EngineBroken(RuntimeError):
    """Fatal: a failed reload left the engine's weights mixed and the last good weights could not be reloaded."""


class InvalidJob(Exception):
    """A job that must be dead-lettered; `kind` is a short label (metrics), `reason` the full why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Job:
    entry_id: str
    pb: rollout_pb2.PromptJob
    task: Task
    problem: Problem
    received_unix: float
    crashes: int = 0  # earlier attempts to sample it that never ended: it is sampled alone


@dataclass(frozen=True)
class JobLimits:
    run_id: str
    max_group_size: int
    max_tokens: int
    max_deliveries: int


# ----------------------------------------------------------------------------- pure parts


def decode_job(
    entry: streams.StreamEntry,
    limits: JobLimits,
    tasks: Callable[[str], Task],
    parse_problem: Callable[[str], Problem],
    now: float,
    crashes: int = 0,
) -> Job:
    """The usable job in a stream entry, or InvalidJob saying why not.

    `crashes`: sampling attempts on it that never ended (streams.unfinished_attempts); re-reads after a
    restart and takeovers (Redis's delivery count) do not count."""
    if crashes >= limits.max_deliveries:
        raise InvalidJob(
            "crashes",
            f"{crashes} attempts to sample it never ended (max_deliveries={limits.max_deliveries}): "
            f"the job crashes workers (delivered {entry.deliveries} times)",
        )
    if entry.payload is None:
        raise InvalidJob("payload", f"entry has no {streams.PAYLOAD_FIELD.decode()!r} field")
    try:
        pb = rollout_pb2.PromptJob.FromString(entry.payload)
    except DecodeError as exc:
        raise InvalidJob("protobuf", f"payload is not a PromptJob protobuf: {exc}") from None
    if pb.run_id != limits.run_id:
        raise InvalidJob("run", f"run_id {pb.run_id!r} is not this worker's run {limits.run_id!r}")
    if not pb.job_id:
        raise InvalidJob("job_id", "job_id is empty")
    if not 1 <= pb.group_size <= limits.max_group_size:
        raise InvalidJob("group_size", f"group_size {pb.group_size} is outside [1, {limits.max_group_size}]")
    if not 1 <= pb.max_tokens <= limits.max_tokens:
        raise InvalidJob("max_tokens", f"max_tokens {pb.max_tokens} is outside [1, {limits.max_tokens}]")
    if not (math.isfinite(pb.temperature) and pb.temperature > 0):
        raise InvalidJob("temperature", f"temperature {pb.temperature} must be finite and > 0 for training rollouts")
    try:
        task = tasks(pb.task)
    except (LookupError, ValueError, TypeError) as exc:
        raise InvalidJob("task", f"unknown task {pb.task!r}: {exc}") from None
    try:
        problem = parse_problem(pb.problem_json)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidJob("problem", f"problem_json is not a valid problem: {exc}") from None
    if problem.task != pb.task:
        raise InvalidJob("problem", f"problem_json is a {problem.task!r} problem, the job says task {pb.task!r}")
    return Job(entry.id, pb, task, problem, now, crashes)


def required_version(jobs: Sequence[Job]) -> int:
    """The oldest policy version the learner will train every job of the batch on."""
    return max((job.pb.min_policy_version for job in jobs), default=0)


def sampling_key(job: Job) -> tuple[int, int, float]:
    return job.pb.group_size, job.pb.max_tokens, job.pb.temperature


def sampling_batches(jobs: Sequence[Job]) -> list[tuple[SamplingConfig, list[Job]]]:
    """Jobs split into engine calls that share sampling parameters; the seed mixes the jobs' seeds in order."""
    by_key: dict[tuple[int, int, float], list[Job]] = {}
    for job in jobs:
        by_key.setdefault(sampling_key(job), []).append(job)
    out = []
    for (n, max_tokens, temperature), group in by_key.items():
        seed = int(np.random.SeedSequence([j.pb.seed for j in group]).generate_state(1)[0])
        out.append((SamplingConfig(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed), group))
    return out


def check_group(job: Job, completions: Sequence[Completion]) -> None:
    """G completions, each with one finite, non-positive logprob per token, or InvalidJob."""
    if len(completions) != job.pb.group_size:
        raise InvalidJob("engine", f"engine returned {len(completions)} completions, group_size is {job.pb.group_size}")
    for i, completion in enumerate(completions):
        try:
            check_logprobs(np.asarray(completion.token_ids), np.asarray(completion.logprobs))
        except RolloutLogprobError as exc:
            raise InvalidJob("logprobs", f"completion {i}: {exc}") from None


def score(job: Job, completions: Sequence[Completion]) -> list[float]:
    """The verifier's reward per completion; it must be a number in [0, 1]."""
    rewards = []
    for i, completion in enumerate(completions):
        try:
            reward = float(job.task.verify(job.problem, completion.text))  # the task extracts its own answer
        except Exception as exc:  # a verifier failing on this problem makes the job unusable, not the worker
            raise InvalidJob("verifier", f"completion {i}: verifier raised {type(exc).__name__}: {exc}") from None
        if not (math.isfinite(reward) and 0.0 <= reward <= 1.0):
            raise InvalidJob("verifier", f"completion {i}: reward {reward!r} is not in [0, 1]")
        rewards.append(reward)
    return rewards


def build_sample(completion: Completion, reward: float) -> rollout_pb2.Sample:
    return rollout_pb2.Sample(
        prompt_ids=int32_to_bytes(np.asarray(completion.prompt_token_ids), "prompt_ids"),
        completion_ids=int32_to_bytes(np.asarray(completion.token_ids), "completion_ids"),
        logprobs=float32_to_bytes(np.asarray(completion.logprobs, dtype=np.float32), "logprobs"),
        text=completion.text,
        reward=reward,
        finish_reason=completion.finish_reason,
    )


@dataclass(frozen=True)
class GroupMeta:
    """What every group of one batch shares."""

    policy_version: int
    precision: PrecisionLabel  # the engine's own (labels.py): scheme, KV cache dtype, head
    worker_id: str
    model_id: str
    generate_s: float


def build_group(
    job: Job, completions: Sequence[Completion], rewards: Sequence[float], meta: GroupMeta, score_s: float, now: float
) -> rollout_pb2.TrajectoryGroup:
    created = job.pb.created_unix
    return rollout_pb2.TrajectoryGroup(
        run_id=job.pb.run_id,
        job_id=job.pb.job_id,
        task=job.pb.task,
        problem_uid=job.problem.uid,
        policy_version=meta.policy_version,
        precision=meta.precision.precision,
        kv_cache_dtype=meta.precision.kv_cache_dtype,
        lm_head_quantized=meta.precision.lm_head_quantized,
        worker_id=meta.worker_id,
        samples=[build_sample(c, r) for c, r in zip(completions, rewards, strict=True)],
        timings=rollout_pb2.Timings(
            queue_wait_s=max(0.0, job.received_unix - created) if created > 0 else 0.0,
            generate_s=meta.generate_s,
            score_s=score_s,
        ),
        created_unix=now,
        model_id=meta.model_id,
    )


# ----------------------------------------------------------------------------- the loop


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleeps for `seconds`, or less when stop is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def unless_stopped(stop: asyncio.Event, awaitable: Awaitable[T]) -> T | None:
    """The awaitable's result, or None when stop is set first (the awaitable is then cancelled)."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this coroutine is cancelled: leave nothing running
        stopper.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


class RolloutWorker:
    """One consumer of the run's prompts stream; see the module invariants."""

    def __init__(
        self,
        client: Any,
        engine: RolloutEngine,
        settings: RolloutSettings,
        metrics: RolloutMetrics,
        *,
        tasks: Callable[[str], Task],
        parse_problem: Callable[[str], Problem],
        model_id: str,
        weights: WeightSource | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.streams = streams.RunStreams(settings.run_id, settings.key_prefix)
        self.group = settings.consumer_group
        self.worker_id = settings.worker_id
        self.limits = JobLimits(
            settings.run_id, settings.max_group_size, settings.max_tokens_limit, settings.max_deliveries
        )
        self.model_id = model_id
        self.weights = weights
        # Engines are synchronous and not thread-safe: every call runs on this one thread.
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.clock = clock
        self.version = settings.initial_version
        self.loaded_dir = Path(engine.model_dir)  # the weights of self.version: what a broken engine reloads
        self._task_lookup = tasks
        self._tasks: dict[str, Task] = {}
        self._parse_problem = parse_problem
        self._own_pending = True  # first read this consumer's own unacknowledged jobs (restart with the same id)
        self._next_reclaim = 0.0
        self._in_flight: list[str] = []
        metrics.set_version(self.version)

    # -- plumbing

    def _task(self, name: str) -> Task:
        if name not in self._tasks:
            self._tasks[name] = self._task_lookup(name)
        return self._tasks[name]

    async def _engine_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _log(self, level: int, msg: str, **fields: object) -> None:
        log.log(level, msg, extra=log_fields(run=self.settings.run_id, worker=self.worker_id, **fields))

    # -- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Serves jobs until stop is set (finishing the current batch)."""
        await streams.ensure_group(self.client, self.streams.prompts, self.group)
        self._log(logging.INFO, "worker started", version=self.version, group=self.group)
        while not stop.is_set():
            await self.run_once(stop)
        self._log(logging.INFO, "worker stopped", version=self.version)

    async def run_once(self, stop: asyncio.Event) -> int:
        """One iteration: backpressure, reload, read, process. Returns the number of entries handled."""
        if not await self.wait_for_room(stop):
            return 0
        await self.maybe_reload()
        entries = await self.next_entries()
        if not entries:
            return 0
        self._in_flight = [e.id for e in entries]
        try:
            if stop.is_set():  # read during shutdown: hand back without starting
                await self._release()
                return 0
            await self.process(entries, stop)
        except BaseException:
            await self._release()
            raise
        finally:
            self._in_flight = []
        return len(entries)

    async def wait_for_room(self, stop: asyncio.Event) -> bool:
        """Waits while the trajectories backlog is at its limit; False when stopped while waiting."""
        limit = self.settings.max_trajectories_backlog
        if limit == 0:
            return not stop.is_set()
        started = None
        while not stop.is_set():
            backlog = await streams.backlog(self.client, self.streams.trajectories, cap=limit)
            if backlog < limit:
                if started is not None:
                    self.metrics.backpressure_seconds.inc(time.monotonic() - started)
                    self._log(logging.INFO, "backpressure released", backlog=backlog)
                return True
            if started is None:
                started = time.monotonic()
                self.metrics.backpressure_waits.inc()
                self._log(logging.INFO, "backpressure: waiting for the learner", backlog=backlog, limit=limit)
            await wait_or_stop(stop, self.settings.backpressure_poll_s)
        if started is not None:
            self.metrics.backpressure_seconds.inc(time.monotonic() - started)
        return False

    async def maybe_reload(self) -> None:
        """Loads the newest fetched weights, if any; on failure keeps (or restores) the current version."""
        fetched = self.weights.take_ready() if self.weights else None
        if fetched is None or fetched.version <= self.version:
            return
        try:
            seconds = await self._engine_call(self.engine.load_weights, fetched.path)
        except Exception as exc:  # the follower counts it and fetches the version again after a backoff
            broken = self.engine.broken  # None: the engine kept its old weights
            then = "restoring the last good weights" if broken else "keeping the old version"
            self._log(logging.ERROR, f"weight reload failed, {then}", version=self.version,
                      new_version=fetched.version, error=repr(exc), broken=broken)  # fmt: skip
            self.weights.reload_failed(fetched, exc)
            if broken:
                await self._restore(broken)
            return
        previous, self.version, self.loaded_dir = self.version, fetched.version, fetched.path
        self.metrics.set_version(self.version)
        self.metrics.reload_seconds.set(seconds)
        self.metrics.reloads.inc()
        self.weights.loaded(fetched)
        self._log(logging.INFO, "weights reloaded", version=self.version, previous=previous,
                  reload_s=round(seconds, 4), fetch_s=round(fetched.fetch_seconds, 4))  # fmt: skip

    async def _restore(self, why: str) -> None:
        """Reloads the current version's directory into a broken engine; EngineBroken when that fails too."""
        try:
            seconds = await self._engine_call(self.engine.load_weights, self.loaded_dir)
            error = self.engine.broken
        except Exception as exc:
            error = repr(exc)
        if error is not None:
            self._log(logging.CRITICAL, "engine broken and the last good weights do not load: stopping",
                      version=self.version, path=str(self.loaded_dir), error=error)  # fmt: skip
            raise EngineBroken(f"{why}; reloading version {self.version} from {self.loaded_dir} failed too: {error}")
        self.metrics.restores.inc()
        self._log(logging.WARNING, "last good weights restored", version=self.version, path=str(self.loaded_dir),
                  reload_s=round(seconds, 4))  # fmt: skip

    async def reach_version(self, required: int, stop: asyncio.Event) -> bool:
        """Before sampling: loads a version >= required, waiting up to version_wait_s for the follower to fetch it.

        False when stop is set while waiting (nothing may be sampled then); otherwise True, also when the
        version was not reached in time (the batch is then sampled under the loaded one, counted and logged).
        """
        wait_s = self.settings.version_wait_s
        if required <= self.version or self.weights is None or wait_s == 0:
            return True
        self.metrics.version_waits.inc()
        self._log(logging.INFO, "waiting for the policy version the jobs require", version=self.version,
                  required=required)  # fmt: skip
        t0 = time.monotonic()
        fetched = await unless_stopped(stop, self.weights.wait_for_version(required, wait_s))
        waited = time.monotonic() - t0
        self.metrics.version_wait_seconds.inc(waited)
        if fetched is None:
            return False
        await self.maybe_reload()  # also after a timeout: anything newer than loaded is still better
        if self.version < required:
            self.metrics.version_wait_timeouts.inc()
            self._log(logging.WARNING, "sampling under an older policy version than the jobs require",
                      version=self.version, required=required, waited_s=round(waited, 3),
                      reason="reload failed" if fetched else "wait timed out")  # fmt: skip
        return True

    async def next_entries(self) -> list[streams.StreamEntry]:
        """Own pending jobs first, then idle jobs of other consumers (every reclaim interval), then new jobs."""
        s, size = self.settings, self.settings.batch_size
        entries: list[streams.StreamEntry] = []
        if self._own_pending:
            entries = await streams.read_own_pending(
                self.client, self.streams.prompts, self.group, self.worker_id, size
            )
            self._own_pending = bool(entries)
        now = time.monotonic()
        if len(entries) < size and now >= self._next_reclaim:
            self._next_reclaim = now + s.reclaim_interval_s
            reclaimed = await streams.reclaim_idle(
                self.client, self.streams.prompts, self.group, self.worker_id, s.reclaim_idle_ms, size - len(entries)
            )
            seen = {e.id for e in entries}
            fresh = [e for e in reclaimed.entries if e.id not in seen]
            if fresh:
                self.metrics.reclaimed.inc(len(fresh))
                self._log(logging.WARNING, "reclaimed idle jobs", count=len(fresh), ids=[e.id for e in fresh][:8])
            if reclaimed.vanished:
                self._log(logging.WARNING, "acked pending jobs deleted from the stream", count=reclaimed.vanished)
            entries += fresh
        if len(entries) < size:
            entries += await streams.read_new(
                self.client, self.streams.prompts, self.group, self.worker_id,
                count=size - len(entries), block_ms=None if entries else s.block_ms,
            )  # fmt: skip
        return entries

    async def process(self, entries: Sequence[streams.StreamEntry], stop: asyncio.Event | None = None) -> None:
        """Decodes, samples, scores and writes one batch (see the module invariants)."""
        started = time.monotonic()
        crashes = await streams.unfinished_attempts(self.client, self.streams.attempts, [e.id for e in entries])
        jobs, dead = self._decode(entries, crashes)
        if dead:  # written at once: a later engine failure must not send them round again
            await self._write([], dead)
        if not jobs:
            return
        if not await self.reach_version(required_version(jobs), stop or asyncio.Event()):
            await self._release()  # stopped while waiting: hand the batch back unsampled
            return
        if self.engine.broken:  # never sample mixed weights (raised before any job is touched)
            raise EngineBroken(f"the engine is broken: {self.engine.broken}")
        version = self.version  # one version for the whole batch
        sampled, failed, generate_s = await self._generate(jobs)
        meta = GroupMeta(
            version, self.engine.precision_label, self.worker_id, self.model_id, generate_s,
        )  # fmt: skip
        groups: list[tuple[Job, rollout_pb2.TrajectoryGroup]] = []
        for job, completions in sampled:
            t0 = time.perf_counter()
            try:
                check_group(job, completions)
                rewards = score(job, completions)
            except InvalidJob as exc:
                failed.append((job.entry_id, job.pb.SerializeToString(), exc))
                continue
            groups.append((job, build_group(job, completions, rewards, meta, time.perf_counter() - t0, self.clock())))
        written = await self._write(groups, failed)
        self._observe(written, time.monotonic() - started, generate_s)

    # -- steps

    def _decode(
        self, entries: Sequence[streams.StreamEntry], crashes: dict[str, int]
    ) -> tuple[list[Job], list[tuple[str, bytes, InvalidJob]]]:
        jobs, dead = [], []
        now = self.clock()
        for entry in entries:
            try:
                jobs.append(
                    decode_job(entry, self.limits, self._task, self._parse_problem, now, crashes.get(entry.id, 0))
                )
            except InvalidJob as exc:
                dead.append((entry.id, entry.payload or b"", exc))
        return jobs, dead

    async def _generate(
        self, jobs: Sequence[Job]
    ) -> tuple[list[tuple[Job, list[Completion]]], list[tuple[str, bytes, InvalidJob]], float]:
        """Completions per job. Prompts the engine cannot sample whole are refused first, job by job; a batch
        the engine still fails is retried job by job, to dead-letter only the culprit and sample the others."""
        sampled: list[tuple[Job, list[Completion]]] = []
        failed: list[tuple[str, bytes, InvalidJob]] = []
        t0 = time.perf_counter()
        refused = await self._engine_call(self._refused_prompts, jobs)
        failed += [self._engine_failure(job, exc) for job, exc in refused]
        refused_ids = {job.entry_id for job, _ in refused}
        jobs = [job for job in jobs if job.entry_id not in refused_ids]
        # A job an earlier attempt crashed on is sampled alone: a crash then charges no other job.
        calls = sampling_batches([job for job in jobs if not job.crashes])
        calls += [call for job in jobs if job.crashes for call in sampling_batches([job])]
        for sampling, group in calls:
            try:
                sampled += await self._sample(group, sampling)
            except Exception as exc:  # which job (if any) is at fault is only known by sampling each alone
                if len(group) == 1 and isinstance(exc, JOB_ERRORS):
                    failed.append(self._engine_failure(group[0], exc))
                    continue
                if len(group) == 1:
                    raise  # not a refusal of this job: the engine is in trouble (a real failure of the worker)
                self._log(logging.WARNING, "engine failed a batch, sampling its jobs one by one", error=repr(exc),
                          jobs=len(group))  # fmt: skip
                for job in group:
                    try:
                        sampled += await self._sample([job], sampling)
                    except JOB_ERRORS as single:
                        failed.append(self._engine_failure(job, single))
        return sampled, failed, time.perf_counter() - t0

    def _refused_prompts(self, jobs: Sequence[Job]) -> list[tuple[Job, PromptRejected]]:
        """The jobs whose prompt the engine cannot sample whole (too long, no tokens, unknown token ids)."""
        refused = []
        for job in jobs:
            try:
                self.engine.check_prompt(job.problem.prompt, job.pb.max_tokens)
            except PromptRejected as exc:
                refused.append((job, exc))
        return refused

    async def _sample(self, jobs: Sequence[Job], sampling: SamplingConfig) -> list[tuple[Job, list[Completion]]]:
        """One engine call, recorded as an attempt on its jobs (streams' `attempts`) until it returns. A crash or
        kill of the worker meanwhile leaves the attempt charged; so does an error that is not a job error on a
        job sampled alone (it propagates: the worker crashed on that job). Any other ending ends the attempt."""
        ids = [job.entry_id for job in jobs]
        await streams.begin_attempts(self.client, self.streams.attempts, ids)
        try:
            outputs = await self._engine_call(self.engine.generate, [job.problem.prompt for job in jobs], sampling)
        except BaseException as exc:
            if len(jobs) > 1 or isinstance(exc, (asyncio.CancelledError, *JOB_ERRORS)):
                with contextlib.suppress(Exception):  # Redis gone: the attempt stays charged, once
                    await streams.end_attempts(self.client, self.streams.attempts, ids)
            raise
        await streams.end_attempts(self.client, self.streams.attempts, ids)
        if len(outputs) != len(jobs):  # an engine bug, not a bad job
            raise RuntimeError(f"engine returned {len(outputs)} groups for {len(jobs)} prompts")
        return list(zip(jobs, outputs, strict=True))

    @staticmethod
    def _engine_failure(job: Job, exc: Exception) -> tuple[str, bytes, InvalidJob]:
        kinds = ((PromptRejected, "prompt"), (RolloutLogprobError, "logprobs"))
        kind = next((name for cls, name in kinds if isinstance(exc, cls)), "engine")
        return job.entry_id, job.pb.SerializeToString(), InvalidJob(kind, f"engine refused the job: {exc}")

    async def _write(
        self, groups: Sequence[tuple[Job, rollout_pb2.TrajectoryGroup]], dead: Sequence[tuple[str, bytes, InvalidJob]]
    ) -> list[rollout_pb2.TrajectoryGroup]:
        """One atomic append-and-ack for the groups and dead letters of a batch; returns the groups written."""
        now = self.clock()
        appends = [streams.Append(job.entry_id, self.streams.trajectories, g.SerializeToString()) for job, g in groups]
        appends += [
            streams.Append(
                entry_id,
                self.streams.deadletter,
                streams.dead_letter(self.streams.prompts, entry_id, exc.reason, payload, self.worker_id, now)
                .SerializeToString(),
            )
            for entry_id, payload, exc in dead
        ]  # fmt: skip
        written = await streams.append_and_ack(self.client, self.streams.prompts, self.group, self.worker_id, appends)
        done = [a.source_id for a, new_id in zip(appends, written, strict=True) if new_id is not None]
        await streams.forget_attempts(self.client, self.streams.attempts, done)
        resolved = {a.source_id for a in appends}
        self._in_flight = [i for i in self._in_flight if i not in resolved]
        for (job, _), new_id in zip(groups, written, strict=False):
            if new_id is None:
                self.metrics.lost.inc()
                self._log(logging.WARNING, "job was reclaimed by another worker; result dropped", job=job.pb.job_id)
        for (entry_id, _, exc), new_id in zip(dead, written[len(groups) :], strict=True):
            if new_id is not None:
                self.metrics.dead_lettered.labels(kind=exc.kind).inc()
                self._log(logging.WARNING, "job dead-lettered", entry=entry_id, kind=exc.kind, reason=exc.reason)
        return [g for (_, g), new_id in zip(groups, written, strict=False) if new_id is not None]

    def _observe(self, written: Sequence[rollout_pb2.TrajectoryGroup], seconds: float, sample_s: float) -> None:
        if not written:
            return
        tokens = sum(len(s.completion_ids) // 4 for g in written for s in g.samples)
        rewards = [s.reward for g in written for s in g.samples]
        self.metrics.groups.inc(len(written))
        self.metrics.samples.inc(len(rewards))
        self.metrics.tokens.inc(tokens)
        self.metrics.batch_seconds.observe(seconds)
        if seconds > 0:
            self.metrics.tokens_per_second.set(tokens / seconds)
            self.metrics.groups_per_second.set(len(written) / seconds)
        self.metrics.reward.set(sum(rewards) / len(rewards))
        # seconds: the whole batch (waiting for its version included); sample_s: inside the engine only
        self._log(logging.INFO, "batch written", groups=len(written), tokens=tokens, seconds=round(seconds, 3),
                  sample_s=round(sample_s, 3), version=self.version)  # fmt: skip

    async def _release(self) -> None:
        ids, self._in_flight = self._in_flight, []
        if not ids:
            return
        try:
            count = await streams.release(self.client, self.streams.prompts, self.group, self.worker_id, ids)
        except Exception as exc:  # Redis gone: the jobs stay pending and are reclaimed after the idle time
            self._log(logging.ERROR, "could not release unfinished jobs", count=len(ids), error=repr(exc))
            return
        self.metrics.released.inc(count)
        self._log(logging.INFO, "released unfinished jobs", count=count)
