"""Synthetic mismatch batches for the demo, benchmarks and tests.

Invariant: deterministic in the seed; logprobs are valid (<= 0) and the rollout logprobs
differ from the learner's by a zero-mean perturbation whose size is `mismatch`, which is
roughly what weight rounding to FP8 does to token logprobs.
"""

from __future__ import annotations

import numpy as np

from aisrl.core.types import MismatchArrays


def synthetic_batch(
    n_sequences: int = 64,
    mean_length: int = 32,
    mismatch: float = 0.05,
    seed: int = 0,
) -> MismatchArrays:
    """A packed batch of n_sequences with lengths around mean_length and GRPO-like advantages."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, mean_length // 2), mean_length * 3 // 2 + 1, size=n_sequences)
    n = int(lengths.sum())
    lp_pi = -rng.gamma(shape=0.6, scale=1.2, size=n)  # mostly confident tokens, a heavy tail
    lp_mu = np.minimum(lp_pi + rng.normal(0.0, mismatch, size=n), 0.0)
    rewards = rng.integers(0, 2, size=n_sequences).astype(np.float64)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return MismatchArrays(lp_pi=lp_pi, lp_mu=lp_mu, lengths=lengths.astype(np.int64), advantages=advantages)
