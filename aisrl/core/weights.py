"""The importance weights of docs/ais.md as small pure functions: the readable definitions that the fast,
blocked path of `aisrl.core.ais` must agree with, shared by it, the corrections and the learner.

Invariant: inputs are packed batches (flat per-token arrays, `lengths` per sequence); every function
is a pure function of its arguments and allocates its result.
"""

from __future__ import annotations

import math

import numpy as np

from aisrl.core.types import LOG_RATIO_CLAMP, WeightLevel


def sequence_starts(lengths: np.ndarray) -> np.ndarray:
    """Index of the first token of every sequence of a packed batch."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def log_ratios(lp_pi: np.ndarray, lp_mu: np.ndarray) -> np.ndarray:
    """delta = clamp(lp_pi - lp_mu, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), per token."""
    return np.clip(np.subtract(lp_pi, lp_mu, dtype=np.float64), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_weights(delta_sums: np.ndarray, lengths: np.ndarray, level: WeightLevel) -> np.ndarray:
    """log w_s of each sequence from its sum of (clamped) deltas, at a sequence level."""
    if level is WeightLevel.SEQUENCE:
        return np.clip(delta_sums, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if level is WeightLevel.GEOMETRIC:
        return delta_sums / lengths
    raise ValueError(f"{level} is not a sequence level")


def carried_weights(delta: np.ndarray, lengths: np.ndarray, level: WeightLevel) -> np.ndarray:
    """The weight every token carries at `level` (float64[N]), from the clamped per-token deltas."""
    if level is WeightLevel.TOKEN:
        return np.exp(delta)
    sums = np.add.reduceat(delta, sequence_starts(lengths))
    return np.repeat(np.exp(sequence_log_weights(sums, lengths, level)), lengths)


def mis_bounds(cap: float | None) -> tuple[float, float]:
    """The interval [1/C, C] that mis keeps; without a cap it is [0, inf) (nothing masked), and a
    cap below 1 makes it empty (everything masked): the formula's own limits, not special cases."""
    if cap is None:
        return 0.0, math.inf
    return 1.0 / cap, cap


def applied_weights(weights: np.ndarray, cap: float | None) -> np.ndarray:
    """wt = min(w, C); the weights themselves without a cap."""
    return weights if cap is None else np.minimum(weights, cap)
