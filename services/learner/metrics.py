"""Prometheus metrics of the learner, on a registry owned by one learner (no global registry).

Invariant: counters count what happened (a group is counted stale once it is re-queued, a step
is counted local once its alpha was computed by the learner); gauges hold the latest step's values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("wait", "prepare", "diagnostics", "update", "publish", "checkpoint")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class LearnerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.step = Gauge("aisrl_learner_step", "Batches consumed (optimizer steps, skipped ones included)", registry=r)
        self.version = Gauge("aisrl_learner_policy_version", "Policy version being served", registry=r)
        self.reward = Gauge("aisrl_learner_reward_mean", "Mean reward of the latest batch", registry=r)
        self.accuracy = Gauge("aisrl_learner_accuracy", "Held-out accuracy of the latest evaluation", ["kind"],
                              registry=r)  # fmt: skip
        self.alpha = Gauge("aisrl_learner_alpha", "AIS mixing coefficient used by the latest step", registry=r)
        self.alpha_ais = Gauge(
            "aisrl_learner_alpha_ais", "Shadow alpha: what ais mode would use on the latest batch", registry=r
        )
        self.frac_masked = Gauge(
            "aisrl_learner_frac_masked", "Share of the latest batch's tokens masked out of the loss", registry=r
        )
        self.kl = Gauge("aisrl_learner_kl", "k3 KL(mu || pi) of the latest batch", registry=r)
        self.loss = Gauge("aisrl_learner_loss", "Mixed PPO-clip loss of the latest step (first minibatch)", registry=r)
        self.grad_norm = Gauge("aisrl_learner_grad_norm", "Gradient norm before clipping, latest update", registry=r)
        self.tokens_per_second = Gauge(
            "aisrl_learner_tokens_per_second", "Completion tokens trained per second of the latest step", registry=r
        )
        self.tokens = Counter("aisrl_learner_tokens", "Completion tokens trained on", registry=r)
        self.stale_groups = Counter(
            "aisrl_learner_stale_groups",
            "Groups older than max_staleness, not trained on, prompt re-queued",
            registry=r,
        )
        self.staleness = Histogram(
            "aisrl_learner_group_staleness", "Version lag of trained groups", buckets=(0, 1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )  # fmt: skip
        self.dead_lettered = Counter("aisrl_learner_dead_lettered", "Groups dead-lettered", ["kind"], registry=r)
        self.rounded_logprobs = Counter(
            "aisrl_learner_rounded_logprobs", "Rollout logprobs in (0, 1e-4] used as 0 (float32 rounding)", registry=r
        )
        self.local_alpha = Counter(
            "aisrl_learner_alpha_local", "Steps whose alpha the learner computed itself", ["reason"], registry=r
        )
        self.skipped_steps = Counter(
            "aisrl_learner_skipped_steps", "Steps without an update (every token masked)", registry=r
        )
        self.checkpoints = Counter("aisrl_learner_checkpoints", "Checkpoints written", registry=r)
        self.acked = Counter("aisrl_learner_acked_groups", "Trajectory groups acknowledged after a checkpoint",
                             registry=r)  # fmt: skip
        self.phase_seconds = Histogram(
            "aisrl_learner_phase_seconds", "Seconds per phase of a step", ["phase"], buckets=_SECONDS, registry=r
        )
        self.step_seconds = Gauge("aisrl_learner_step_seconds", "Wall time of the latest step", registry=r)
        self.ready = Gauge("aisrl_learner_ready", "1 once the model is loaded and weights are served", registry=r)
