"""Staleness by admission (AReaL's rule), as a small pure state machine.

Invariant: a new prompt job is admitted only while, counting it,

    accepted + running <= (max_staleness + current_version + 1) * batch_size

where `accepted` counts trajectory groups the learner has taken for training since the run began,
`running` counts admitted jobs whose group the learner has not taken or rejected yet, and
`current_version` counts the batches the learner has consumed (AReaL's version: one per optimizer
step). So at most (max_staleness + 1) batches are ever in flight or waiting, and a group sampled
under version v is trained on by version v + max_staleness at the latest unless it straggles;
what still slips past is dropped at train time (batcher.py). A re-queued job replaces the one
it re-queues (running is unchanged), so re-queuing never breaks the bound.

Re-seeding on resume (AReaL #1388 lost the bound after a restart because its counters restarted at
zero while the version did not): `accepted` restarts at the groups consumed by the checkpointed
steps, and `running` at the jobs still in Redis (prompt jobs not finished by a rollout worker plus
groups the learner has not taken), see `reseed`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StalenessGate:
    """Counters of AReaL's admission rule (module docstring)."""

    batch_size: int
    max_staleness: int
    accepted: int = 0
    running: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_staleness < 0:
            raise ValueError(
                f"need batch_size >= 1 and max_staleness >= 0, got {self.batch_size}, {self.max_staleness}"
            )
        if self.accepted < 0 or self.running < 0:
            raise ValueError(f"counters must be >= 0, got accepted={self.accepted}, running={self.running}")

    def bound(self, current_version: int) -> int:
        return (self.max_staleness + current_version + 1) * self.batch_size

    def capacity(self, current_version: int) -> int:
        """How many new jobs may be admitted now (never negative)."""
        return max(0, self.bound(current_version) - (self.accepted + self.running))

    def admit(self, current_version: int, want: int = 1) -> int:
        """Admits up to `want` jobs; returns how many were admitted (they are now running)."""
        granted = min(max(0, want), self.capacity(current_version))
        self.running += granted
        return granted

    def on_accepted(self, count: int = 1) -> None:
        """Groups taken for training: running -> accepted."""
        self.running = max(0, self.running - count)
        self.accepted += count

    def on_rejected(self, count: int = 1) -> None:
        """Jobs that will never produce a group (dead-lettered): they stop counting."""
        self.running = max(0, self.running - count)


def reseed(
    batch_size: int, max_staleness: int, consumed_groups: int, prompts_backlog: int, trajectories_backlog: int
) -> StalenessGate:
    """The gate after a restart.

    consumed_groups: groups used by the steps in the checkpoint (taken before and trained on).
    prompts_backlog: prompt jobs not finished by the rollout consumer group (lag + pending).
    trajectories_backlog: groups the learner has not acknowledged, after acking those the
    checkpoint already includes (they will be taken again, so they are running, not accepted).
    """
    return StalenessGate(
        batch_size, max_staleness, accepted=consumed_groups, running=prompts_backlog + trajectories_backlog
    )
