"""AReaL's admission rule (services/learner/staleness.py), including re-seeding on resume."""

from __future__ import annotations

import numpy as np
import pytest

from aisrl.services.learner.staleness import StalenessGate, reseed


def test_first_admission_fills_max_staleness_plus_one_batches():
    gate = StalenessGate(batch_size=4, max_staleness=2)
    assert gate.capacity(0) == 12  # (2 + 0 + 1) * 4
    assert gate.admit(0, want=100) == 12
    assert gate.admit(0) == 0 and gate.running == 12


def test_each_version_opens_one_batch():
    gate = StalenessGate(batch_size=4, max_staleness=0)
    assert gate.admit(0, want=100) == 4
    gate.on_accepted(4)  # the learner took a batch ...
    assert gate.capacity(0) == 0  # ... but until its step ends (version 1) nothing more is admitted
    assert gate.capacity(1) == 4


def test_rejected_jobs_free_their_slot():
    gate = StalenessGate(batch_size=2, max_staleness=0)
    gate.admit(0, want=2)
    gate.on_rejected()
    assert gate.capacity(0) == 1


def test_bound_holds_under_any_interleaving():
    rng = np.random.default_rng(0)
    for trial in range(200):
        b, s = int(rng.integers(1, 6)), int(rng.integers(0, 4))
        gate, version = StalenessGate(b, s), 0
        for _ in range(100):
            op = rng.integers(0, 4)
            if op == 0:
                gate.admit(version, want=int(rng.integers(0, 10)))
            elif op == 1 and gate.running:
                gate.on_accepted(int(rng.integers(1, gate.running + 1)))
            elif op == 2 and gate.running:
                gate.on_rejected()
            elif op == 3 and gate.accepted >= (version + 1) * b:
                version += 1  # a step consumes a batch of accepted groups
            assert gate.accepted + gate.running <= gate.bound(version), trial


def test_reseed_matches_the_uninterrupted_gate():
    """Restart at version 5 with 5 batches consumed and 3 jobs still in Redis: same capacity as before the crash."""
    b, s, v = 4, 1, 5
    before = StalenessGate(b, s, accepted=v * b, running=3)
    after = reseed(b, s, consumed_groups=v * b, prompts_backlog=2, trajectories_backlog=1)
    assert after.capacity(v) == before.capacity(v) == (s + v + 1) * b - v * b - 3


def test_zero_counters_after_restart_would_break_the_bound():
    """AReaL #1388: counters restarting at zero with the version kept admit far beyond the bound."""
    b, s, v = 4, 1, 50
    naive = StalenessGate(b, s)
    reseeded = reseed(b, s, consumed_groups=v * b, prompts_backlog=8, trajectories_backlog=0)
    assert naive.capacity(v) == (s + v + 1) * b  # 208 jobs: 50 batches beyond the bound
    assert reseeded.capacity(v) == 0  # already (s + 1) batches in flight


def test_invalid_gate():
    with pytest.raises(ValueError, match="batch_size"):
        StalenessGate(0, 1)
