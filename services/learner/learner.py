"""The learner's step loop: batch -> lp_pi -> alpha -> GRPO update -> publish -> checkpoint -> ack.

Acknowledgement rule (the invariant this module keeps): a trajectory group is acknowledged on the
trajectories stream only once a checkpoint that includes its update is on disk. Its entry id is
kept in `used_unacked` from the step that trains on it until then, and is written into that
checkpoint; the ack follows the fsync and rename. Hence, for a learner killed at any point:
- before the checkpoint: the group is still pending; the restarted learner restores the previous
  checkpoint (which does not hold the update), re-reads its own pending groups and trains on them
  once, in the surviving line of updates. Nothing acknowledged was lost.
- after the checkpoint, before the ack: the restarted learner acknowledges every id listed in the
  checkpoint before it reads anything, so those groups are not trained on twice.
Stale and invalid groups are not trained on; they are resolved at once (re-queued or
dead-lettered, atomically with their ack: batcher.py).

Versions: every update makes a new policy version, served and announced before the checkpoint.
On resume the restored weights are served under `weights_server.resume_version` (a version newer
than any announced, when updates after the checkpoint were announced and lost).

Compute (torch) runs in worker threads (`asyncio.to_thread`), one step at a time; the event loop
keeps serving gRPC, HTTP and the feeder meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aisrl import streams
from aisrl.logs import log_fields
from aisrl.redis_conn import async_client
from aisrl.services.learner import checkpoint as ckpt
from aisrl.services.learner.batcher import Batcher, BatcherConfig
from aisrl.services.learner.config import LearnerSettings
from aisrl.services.learner.diag_client import DiagnosticsClient
from aisrl.services.learner.evaluate import EvalResult, Evaluator
from aisrl.services.learner.feeder import Feeder, JobSpec, ProblemSource
from aisrl.services.learner.metrics import LearnerMetrics
from aisrl.services.learner.staleness import reseed
from aisrl.services.learner.trainer import TrainConfig, Trainer
from aisrl.services.learner.weights_server import (
    WeightStore,
    announce,
    last_announced,
    make_notice,
    resume_version,
    start_weights_server,
)

log = logging.getLogger("aisrl.learner")


@dataclass
class StepRecord:
    """What one step did; logged, kept as `Learner.last_record`, served on /status."""

    step: int
    version: int
    groups: int
    tokens: int
    reward_mean: float
    alpha: float
    alpha_ais: float  # the shadow alpha: what ais mode would use on this batch, in every mode
    frac_masked: float  # share of tokens masked out of the loss (every mask together)
    computed_locally: bool
    kl: float
    loss: float | None
    grad_norm: float | None
    skipped: bool
    stale: int
    staleness_max: int
    tokens_per_second: float
    seconds: dict[str, float]
    entry_ids: list[str] = field(repr=False)
    diagnostics: dict[str, Any] = field(repr=False, default_factory=dict)


def resolve_model_dir(settings: LearnerSettings) -> Path:
    """settings.model_path, or the random tiny model the rollout worker also creates from `seed`."""
    if settings.model_path:
        path = Path(settings.model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_path {path} is not a checkpoint directory (no config.json)")
        return path
    path = Path(settings.work_dir) / "tiny-model"
    if not (path / "config.json").is_file():
        from aisrl.models.tiny import init_model_dir

        log.warning("no model_path: training a random tiny model (demo only)", extra=log_fields(path=str(path)))
        init_model_dir(path, seed=settings.seed)
    return path


def default_task(settings: LearnerSettings) -> tuple[Any, ProblemSource]:
    """The task object and the feeder's problem source, from aisrl.tasks."""
    from aisrl.tasks import get_task, problem_to_json

    task = get_task(settings.task, **settings.task_options)

    def source(index: int) -> tuple[str, str]:
        problem = task.train_problem(settings.seed, index)
        return problem.task, problem_to_json(problem)

    return task, source


def train_config(settings: LearnerSettings) -> TrainConfig:
    return TrainConfig(
        lr=settings.lr, warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay,
        betas=(settings.adam_beta1, settings.adam_beta2), grad_clip=settings.grad_clip,
        ppo_epochs=settings.ppo_epochs, minibatches=settings.minibatches,
        micro_batch_size=settings.micro_batch_size, eps_lo=settings.eps_lo, eps_hi=settings.eps_hi,
        temperature=settings.temperature, std_normalize=settings.advantage_std_normalize,
        compute_dtype=settings.compute_dtype, seed=settings.seed,
        reuse_forward=settings.reuse_forward, share_prompts=settings.share_prompts,
    )  # fmt: skip


def load_trainer(model_dir: Path, settings: LearnerSettings) -> tuple[Trainer, Any]:
    """The trainer (float32 master weights of model_dir, the settings' optimizer) and the model's tokenizer."""
    from transformers import AutoTokenizer

    from aisrl.models.tiny import load_model

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model = load_model(model_dir, dtype=torch.float32)
    return Trainer(model, train_config(settings), pad_id=pad_id), tokenizer


class Learner:
    """One learner process's state and wiring. `start`, then `run` (or `step_once`), then `close`."""

    def __init__(
        self,
        settings: LearnerSettings,
        redis_url: str,
        *,
        task: Any = None,
        problem_source: ProblemSource | None = None,
        metrics: LearnerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.task = task
        self.problem_source = problem_source
        self.metrics = metrics or LearnerMetrics()
        self.streams = streams.RunStreams(settings.run_id, settings.key_prefix)
        self.checkpoint_dir = Path(settings.work_dir) / "checkpoints"
        self.step = 0
        self.version = 0
        self.consumed_groups = 0
        self.prev_ema: float | None = None
        self.used_unacked: list[str] = []
        self.last_checkpoint_step: int | None = None
        self.resumed_from: int | None = None
        self.last_record: StepRecord | None = None
        self.last_eval: EvalResult | None = None
        # (step, result) of the latest evaluation the diagnostics service has not recorded yet: it travels with
        # the next batch (the evaluation runs after the step's batch was sent)
        self.unsent_eval: tuple[int, EvalResult] | None = None
        self.ready = False
        self._started = False  # start() completed: only then does close() checkpoint
        self._in_step = False  # a step is between taking its batch and recording its update
        self.grpc_port: int | None = None
        self._grpc_server = None
        self.client = None

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        s = self.settings
        self.client = async_client(self.redis_url)
        if self.task is None or self.problem_source is None:
            self.task, self.problem_source = default_task(s)
        self.model_dir = await asyncio.to_thread(resolve_model_dir, s)
        self.trainer, self.tokenizer = await asyncio.to_thread(self._load_model)
        await streams.ensure_group(self.client, self.streams.trajectories, s.consumer_group)
        restored = await asyncio.to_thread(ckpt.latest, self.checkpoint_dir) if s.resume else None
        if restored is not None:
            await self._restore(restored)
        self.gate = reseed(
            s.batch_size, s.max_staleness, self.consumed_groups,
            prompts_backlog=await streams.backlog(self.client, self.streams.prompts),
            trajectories_backlog=await streams.backlog(self.client, self.streams.trajectories),
        )  # fmt: skip
        spec = JobSpec(s.run_id, s.group_size, s.max_tokens, s.temperature, s.max_staleness, s.seed)
        self.feeder = Feeder(self.client, self.streams, spec, self.problem_source, self.gate,
                             current_step=lambda: self.step, current_version=lambda: self.version,
                             poll_s=s.feed_poll_s)  # fmt: skip
        # The cursor lives in Redis; the checkpoint's copy covers a Redis that lost its data.
        await self.feeder.load_cursor(at_least=restored.stream.next_problem if restored else 0)
        config = self.trainer.model.config
        self.batcher = Batcher(
            self.client, self.streams,
            BatcherConfig(s.run_id, s.consumer_group, s.consumer_name, s.batch_size, s.max_staleness,
                          s.read_block_ms, s.reclaim_idle_ms, getattr(config, "vocab_size", None),
                          getattr(config, "max_position_embeddings", None)),
            self.gate, self.metrics, self.feeder.requeue_payload, on_rejected=self.feeder.wake.set,
        )  # fmt: skip
        await self.batcher.start()
        self.diagnostics = DiagnosticsClient(s.diagnostics_target, s.run_id, s.correction_config(),
                                             s.diagnostics_timeout_s, self.metrics, s.max_message_mb)  # fmt: skip
        self.evaluator = await asyncio.to_thread(self._make_evaluator) if s.eval_every else None
        self.store = WeightStore(s.weights_keep_versions)
        self._grpc_server, self.grpc_port = await start_weights_server(
            self.store, s.run_id, s.grpc_host, s.grpc_port, s.max_message_mb
        )
        self.endpoint = s.weights_endpoint(self.grpc_port)
        announced = await last_announced(self.client, self.streams)
        self.version = resume_version(self.version, announced)
        await self._publish(announce_it=self.version >= 1)
        self.ready = self._started = True
        self.metrics.ready.set(1)
        self.metrics.step.set(self.step)
        log.info("learner started", extra=log_fields(
            run=s.run_id, step=self.step, version=self.version, resumed_from=self.resumed_from,
            weights=self.endpoint, running=self.gate.running, accepted=self.gate.accepted,
            next_problem=self.feeder.next_index, model=str(self.model_dir)))  # fmt: skip

    def _load_model(self) -> tuple[Trainer, Any]:
        return load_trainer(self.model_dir, self.settings)

    def _make_evaluator(self) -> Evaluator:
        s = self.settings
        return Evaluator(self.tokenizer, self.task, self.task.eval_split(s.eval_size), s.max_tokens, s.temperature,
                         s.eval_samples, s.seed, s.compute_dtype)  # fmt: skip

    async def _restore(self, restored: ckpt.Checkpoint) -> None:
        def load() -> None:
            self.trainer.model.load_state_dict(restored.model)
            self.trainer.optimizer.load_state_dict(restored.optimizer)
            self.trainer.set_rng_state(restored.rng)
            self.trainer.updates = restored.trainer_updates

        await asyncio.to_thread(load)
        self.step, self.version = restored.step, restored.version
        self.consumed_groups, self.prev_ema = restored.stream.consumed_groups, restored.prev_ema
        self.last_checkpoint_step = self.resumed_from = restored.step
        # Groups whose update the checkpoint holds: ack them before reading anything (never trained twice).
        acked = await streams.ack(
            self.client, self.streams.trajectories, self.settings.consumer_group, restored.stream.used_unacked
        )
        self.metrics.acked.inc(acked)
        log.info("resumed from checkpoint", extra=log_fields(step=self.step, version=self.version,
                 acked_on_resume=acked, listed=len(restored.stream.used_unacked)))  # fmt: skip

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Feeds and trains until stop is set or max_steps is reached; a feeder crash stops it and is re-raised."""
        inner = asyncio.Event()  # stop, or the feeder died (the batcher would otherwise wait for groups forever)
        feed_stop = asyncio.Event()

        async def feed() -> None:
            try:
                await self.feeder.run(feed_stop)
            finally:
                inner.set()

        async def relay() -> None:
            await stop.wait()
            inner.set()

        feeder, relayer = asyncio.create_task(feed()), asyncio.create_task(relay())
        try:
            while not inner.is_set() and not self.finished:
                await self.step_once(inner)
        finally:
            feed_stop.set()
            relayer.cancel()
            for task in (feeder, relayer):
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # re-raises a feeder crash

    @property
    def finished(self) -> bool:
        return self.settings.max_steps > 0 and self.step >= self.settings.max_steps

    async def step_once(self, stop: asyncio.Event | None = None) -> StepRecord | None:
        """Takes one batch and trains on it; None when stopped before a batch was complete."""
        t: dict[str, float] = {}
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            t[name] = now - mark
            mark = now

        batch = await self.batcher.next_batch(self.version, stop or asyncio.Event())
        if batch is None:
            return None
        lap("wait")
        self._in_step = True  # until the step's state is consistent again (close() must not checkpoint before)
        groups = batch.groups
        prepared = await asyncio.to_thread(self.trainer.prepare, groups)
        lap("prepare")
        signals = self._signals(prepared)
        coef = await self.diagnostics.coefficient(prepared.arrays, self.step + 1, self.version, self.prev_ema, signals)
        if not coef.computed_locally:  # the service recorded it; else it goes with the next batch again
            self.unsent_eval = None
        lap("diagnostics")
        stats = None
        if coef.n_kept > 0:
            stats = await asyncio.to_thread(self.trainer.update, prepared, coef.token_coef)
        else:  # every token masked: nothing to learn from, and no division by zero (docs/ais.md, "Nothing left")
            self.metrics.skipped_steps.inc()
            log.warning("every token masked: step skipped", extra=log_fields(step=self.step + 1))
        lap("update")
        self.step += 1
        self.consumed_groups += len(groups)
        self.prev_ema = coef.alpha_ema
        self.used_unacked.extend(g.entry_id for g in groups)
        if stats is not None:
            self.version += 1
            await self._publish(announce_it=True)
        self._in_step = False
        self.feeder.wake.set()
        lap("publish")
        if self.step % self.settings.checkpoint_every == 0:
            await self.checkpoint()
        lap("checkpoint")
        record = self._record(batch, prepared, coef, stats, t)
        if self.evaluator is not None and self.step % self.settings.eval_every == 0:
            await self.evaluate()
        return record

    def _signals(self, prepared) -> dict[str, float | int | None]:
        """What the diagnostics service records beside the batch's coefficient (wire.coefficient.LEARNER_SIGNALS)."""
        signals: dict[str, float | int | None] = {"reward_mean": float(np.mean(prepared.rewards))}
        if self.unsent_eval is not None:
            step, result = self.unsent_eval
            signals |= {"eval_step": step, "accuracy_greedy": result.greedy_accuracy,
                        "accuracy_sampled": result.sampled_accuracy}  # fmt: skip
        return signals

    def _record(self, batch, prepared, coef, stats, t: dict[str, float]) -> StepRecord:
        tokens = prepared.n_tokens
        busy = sum(v for k, v in t.items() if k != "wait")
        record = StepRecord(
            step=self.step, version=self.version, groups=len(batch.groups), tokens=tokens,
            reward_mean=float(np.mean(prepared.rewards)), alpha=coef.alpha, computed_locally=coef.computed_locally,
            alpha_ais=float(coef.record["alpha_ais"]), frac_masked=float(coef.record["frac_masked"]),
            kl=float(coef.record["kl"]), loss=stats.loss if stats else None,
            grad_norm=stats.grad_norm if stats else None, skipped=stats is None, stale=batch.stale,
            staleness_max=max(batch.staleness, default=0),
            tokens_per_second=tokens / t["update"] if stats and t["update"] > 0 else 0.0,
            seconds={k: round(v, 4) for k, v in t.items()} | {"busy": round(busy, 4)},
            entry_ids=[g.entry_id for g in batch.groups], diagnostics=coef.record,
        )  # fmt: skip
        m = self.metrics
        m.step.set(self.step)
        m.version.set(self.version)
        m.reward.set(record.reward_mean)
        m.alpha.set(record.alpha)
        m.alpha_ais.set(record.alpha_ais)
        m.frac_masked.set(record.frac_masked)
        m.kl.set(record.kl)
        m.tokens.inc(tokens)
        if stats:
            m.loss.set(stats.loss)
            m.grad_norm.set(stats.grad_norm)
            m.tokens_per_second.set(record.tokens_per_second)
        for phase, seconds in t.items():
            m.phase_seconds.labels(phase=phase).observe(seconds)
        m.step_seconds.set(sum(t.values()))
        self.last_record = record
        fields = log_fields(
            step=record.step, version=record.version, reward=round(record.reward_mean, 4),
            alpha=round(record.alpha, 4), alpha_ais=round(record.alpha_ais, 4),
            frac_masked=round(record.frac_masked, 4), local=record.computed_locally, kl=f"{record.kl:.3g}",
            loss=None if stats is None else round(stats.loss, 5), tokens=tokens,
            grad_norm=None if stats is None else round(stats.grad_norm, 4), tok_s=round(record.tokens_per_second),
            stale=record.stale, skipped=record.skipped, seconds=record.seconds,
        )  # fmt: skip
        log.info("step", extra=fields)
        return record

    # ------------------------------------------------------------------ weights, checkpoints, evaluation

    async def _publish(self, announce_it: bool) -> None:
        """Serves the current parameters as self.version; announces it when asked (versions >= 1)."""
        state = await asyncio.to_thread(self.trainer.weights_state)
        stored = await asyncio.to_thread(self.store.put, self.version, self.step, state)
        if announce_it and stored.version >= 1:
            notice = make_notice(self.settings.run_id, stored, self.endpoint, time.time())
            await announce(self.client, self.streams, notice, self.settings.weights_stream_maxlen)

    def _checkpoint_data(self) -> ckpt.Checkpoint:
        return ckpt.Checkpoint(
            step=self.step, version=self.version,
            model=self.trainer.model.state_dict(), optimizer=self.trainer.optimizer.state_dict(),
            rng=self.trainer.rng_state(),
            stream=ckpt.StreamState(list(self.used_unacked), self.consumed_groups, self.feeder.next_index),
            trainer_updates=self.trainer.updates, prev_ema=self.prev_ema,
            meta={"model_dir": str(self.model_dir), "run_id": self.settings.run_id,
                  "settings": self.settings.model_dump(mode="json")},
        )  # fmt: skip

    async def write_checkpoint(self) -> Path:
        """Writes the checkpoint (atomic) without acknowledging anything."""
        path = await asyncio.to_thread(ckpt.save, self.checkpoint_dir, self._checkpoint_data())
        self.last_checkpoint_step = self.step
        self.metrics.checkpoints.inc()
        return path

    async def ack_used(self) -> int:
        """Acknowledges the groups the last checkpoint holds (call only after write_checkpoint)."""
        ids, self.used_unacked = self.used_unacked, []
        acked = await streams.ack(self.client, self.streams.trajectories, self.settings.consumer_group, ids)
        self.batcher.forget(ids)
        self.metrics.acked.inc(acked)
        return acked

    async def checkpoint(self) -> Path:
        """Checkpoint, then ack the groups it includes (the module's acknowledgement rule)."""
        path = await self.write_checkpoint()
        acked = await self.ack_used()
        await asyncio.to_thread(ckpt.prune, self.checkpoint_dir, self.settings.checkpoint_keep)
        log.info("checkpoint", extra=log_fields(step=self.step, version=self.version, path=str(path), acked=acked))
        return path

    async def evaluate(self) -> EvalResult:
        result = await asyncio.to_thread(self.evaluator.run, self.trainer.model, self.step)
        self.last_eval = result
        self.unsent_eval = (self.step, result)
        self.metrics.accuracy.labels(kind="greedy").set(result.greedy_accuracy)
        if result.sampled_accuracy is not None:
            self.metrics.accuracy.labels(kind="sampled").set(result.sampled_accuracy)
        log.info("evaluation", extra=log_fields(step=self.step, greedy=round(result.greedy_accuracy, 4),
                 sampled=result.sampled_accuracy, n=result.n_problems, seconds=round(result.seconds, 2)))  # fmt: skip
        return result

    # ------------------------------------------------------------------ stopping

    async def close(self) -> None:
        """Graceful stop: checkpoint what is not yet checkpointed (then ack), hand back unused groups."""
        self.ready = False
        self.metrics.ready.set(0)
        try:
            usable = self._started and self.client is not None
            if self._in_step:  # a step died half-way: its partial update must not be checkpointed
                log.error("stopping inside an interrupted step: the last checkpoint stands, nothing is acked")
            elif usable and (self.used_unacked or self.last_checkpoint_step != self.step):
                await self.checkpoint()
            if usable and self.batcher.buffered_ids:
                s = self.settings
                await streams.release(self.client, self.streams.trajectories, s.consumer_group, s.consumer_name,
                                      self.batcher.buffered_ids)  # fmt: skip
        finally:
            await self._close_io()
        log.info("learner stopped", extra=log_fields(step=self.step, version=self.version))

    async def abandon(self) -> None:
        """Stops without checkpointing or acknowledging anything: what a kill leaves behind (tests)."""
        self.ready = False
        await self._close_io()

    async def _close_io(self) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace=1.0)
            self._grpc_server = None
        if hasattr(self, "diagnostics"):
            await self.diagnostics.close()
        if self.client is not None:
            await self.client.aclose()
            self.client = None
