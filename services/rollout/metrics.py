"""Prometheus metrics of one rollout worker, on a registry owned by that worker (no global registry).

Invariant: counters only ever count what happened (a group counts once it is written, a job once
it is dead-lettered); rates (tokens/s, groups/s) are those of the latest batch, beside the
counters that Prometheus' rate() works on.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RolloutMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.groups = Counter("aisrl_rollout_groups", "Trajectory groups written", registry=r)
        self.tokens = Counter("aisrl_rollout_tokens", "Completion tokens sampled in written groups", registry=r)
        self.samples = Counter("aisrl_rollout_samples", "Completions in written groups", registry=r)
        self.tokens_per_second = Gauge(
            "aisrl_rollout_tokens_per_second", "Completion tokens per second over the latest batch", registry=r
        )
        self.groups_per_second = Gauge(
            "aisrl_rollout_groups_per_second", "Groups per second over the latest batch", registry=r
        )
        self.batch_seconds = Histogram(
            "aisrl_rollout_batch_seconds", "Wall time of one batch (read to write)", buckets=_SECONDS, registry=r
        )
        self.reward = Gauge("aisrl_rollout_reward_mean", "Mean reward of the latest batch", registry=r)
        self.policy_version = Gauge(
            "aisrl_rollout_policy_version", "Policy version the engine samples under", registry=r
        )
        self.reload_seconds = Gauge(
            "aisrl_rollout_reload_seconds", "Seconds the latest weight reload took (engine load only)", registry=r
        )
        self.fetch_seconds = Gauge(
            "aisrl_rollout_weights_fetch_seconds", "Seconds the latest weight fetch took (gRPC + save)", registry=r
        )
        self.reloads = Counter("aisrl_rollout_reloads", "Weight versions loaded into the engine", registry=r)
        self.fetch_failures = Counter(
            "aisrl_rollout_weights_fetch_failures", "Failed weight fetches or reloads (old version kept)", registry=r
        )
        self.reclaimed = Counter("aisrl_rollout_reclaimed", "Jobs taken over from idle consumers", registry=r)
        self.released = Counter("aisrl_rollout_released", "Unfinished jobs handed back on shutdown", registry=r)
        self.lost = Counter(
            "aisrl_rollout_lost_jobs", "Finished jobs not written: another consumer had reclaimed them", registry=r
        )
        self.dead_lettered = Counter(
            "aisrl_rollout_dead_lettered", "Jobs dead-lettered, by kind of reason", ["kind"], registry=r
        )
        self.backpressure_waits = Counter(
            "aisrl_rollout_backpressure_waits", "Times the worker waited for the trajectories backlog", registry=r
        )
        self.backpressure_seconds = Counter(
            "aisrl_rollout_backpressure_seconds", "Seconds spent waiting for the trajectories backlog", registry=r
        )
        self.version_waits = Counter(
            "aisrl_rollout_version_waits", "Batches that waited for the policy version their jobs require", registry=r
        )
        self.version_wait_seconds = Counter(
            "aisrl_rollout_version_wait_seconds", "Seconds spent waiting for required policy versions", registry=r
        )
        self.version_wait_timeouts = Counter(
            "aisrl_rollout_version_wait_timeouts",
            "Batches sampled under an older policy version than their jobs require (wait timed out or reload failed)",
            registry=r,
        )
        self.restores = Counter(
            "aisrl_rollout_engine_restores", "Last good weights reloaded after a reload broke the engine", registry=r
        )
        self.ready = Gauge("aisrl_rollout_engine_loaded", "1 once the engine is loaded", registry=r)
        self.current_version = 0

    def set_version(self, version: int) -> None:
        self.current_version = version
        self.policy_version.set(version)
