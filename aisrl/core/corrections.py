"""The composable corrections: masks (IcePop ratio bounds, divergence rejection, M2PO) and
self-normalized weights, as pure numpy on the clamped per-token log ratios (docs/corrections.md).

Invariant: a correction is a weighting (mode, level, cap, self_normalize) and any set of masks,
each of which only removes tokens from the loss; no mask depends on alpha, and none changes the
diagnostics of `aisrl.core.ais` (rho, kl, v, alpha_ais are computed on every carried token), so
the shadow alpha is comparable across modes. Masks combine by AND; each reason is counted on its
own (a token may count under several), M2PO runs last, on the tokens every other mask keeps.

Definitions, for delta_i = clamp(lp_pi_i - lp_mu_i, -20, 20) and token ratio exp(delta_i):

- IcePop (the Ring-1T technical report, section "IcePop"): keep tokens with ratio in
  [mask_ratio_lo, mask_ratio_hi] (either bound optional).
- Divergence rejection (verl, docs/algo/rollout_corr.md, "Rejection sampling" / rollout_rs options):
  token divergences k1 = -delta, k2 = delta^2 / 2, k3 = exp(delta) - 1 - delta; `token_*` drops a
  token whose divergence exceeds the threshold, `seq_{sum,mean,max}_*` drops every token of a
  sequence whose sum / mean / max exceeds it. k1 is signed: its rules drop |aggregate| > threshold
  (verl's symmetric ratio bounds [1/U, U] with U = exp(threshold)).
- M2PO (Zheng et al. 2025, "Prosperity before Collapse"; AReaL's `m2_threshold`): among the
  kept tokens, mask those with the largest delta^2 until mean(delta^2) over the remaining ones is
  at most m2po_threshold (ties: the later token goes first). An empty remainder satisfies it.
- Self-normalized IS: applied weights wt = min(w, C) divided by their mean over the kept tokens
  (token level) or over the sequences that keep a token (sequence levels); verl's
  `rollout_is_batch_normalize`. With nothing kept the weights are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aisrl.core.types import CorrectionConfig, CorrectionMode, RejectRule, WeightLevel
from aisrl.core.weights import applied_weights, carried_weights, mis_bounds, sequence_starts


def token_divergence(delta: np.ndarray, estimator: str) -> np.ndarray:
    """k1 = -delta, k2 = delta^2 / 2, k3 = exp(delta) - 1 - delta (expm1 keeps small values exact)."""
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    if estimator == "k3":
        return np.expm1(delta) - delta
    raise ValueError(f"unknown divergence estimator {estimator!r}")


def reject_drop(delta: np.ndarray, lengths: np.ndarray, rule: RejectRule, threshold: float) -> np.ndarray:
    """bool[N]: tokens dropped by divergence rejection (module docstring)."""
    div = token_divergence(delta, rule.estimator)
    signed = rule.estimator == "k1"
    if rule.aggregation == "token":
        score = np.abs(div) if signed else div
        return score > threshold
    starts = sequence_starts(lengths)
    if rule.aggregation == "max":
        seq = np.maximum.reduceat(div, starts)
    else:
        seq = np.add.reduceat(div, starts)
        if rule.aggregation == "mean":
            seq = seq / lengths
    if signed:
        seq = np.abs(seq)
    return np.repeat(seq > threshold, lengths)


def m2po_keep(delta: np.ndarray, keep: np.ndarray, threshold: float) -> np.ndarray:
    """bool[N]: the kept tokens M2PO leaves (module docstring); masked tokens stay masked.

    The mean of the m smallest delta^2 grows with m, so the tokens left are the m* smallest, m* the
    largest m whose sum is at most threshold * m. Every token with delta^2 <= threshold is among them
    (adding one never lifts the mean above the threshold), so only the larger ones are sorted, and
    only their values (numpy's SIMD sort, several times faster than a stable argsort): the m*-th
    smallest value is the cut, and among tokens equal to it the earlier ones stay.
    """
    q = np.where(keep, delta * delta, np.inf)
    small = q <= threshold
    base_sum, base_n = float(q[small].sum()), int(np.count_nonzero(small))
    idx = np.flatnonzero(keep & ~small)
    large = q[idx]
    ordered = np.sort(large)
    sums = base_sum + np.concatenate([[0.0], np.cumsum(ordered)])
    fits = sums <= threshold * (base_n + np.arange(ordered.size + 1))
    m = int(np.flatnonzero(fits).max())  # fits[0] holds: the small tokens' mean is at most the threshold
    out = small.copy()
    if m:
        cut = ordered[m - 1]
        stays = large < cut
        stays[np.flatnonzero(large == cut)[: m - int(np.count_nonzero(stays))]] = True
        out[idx[stays]] = True
    return out


def self_normalized(weights: np.ndarray, keep: np.ndarray, lengths: np.ndarray, level: WeightLevel) -> np.ndarray:
    """weights / their mean over the kept tokens (token level) or the sequences keeping a token."""
    if not keep.any():
        return weights
    if level is WeightLevel.TOKEN:
        mean = float(weights[keep].mean())
    else:
        starts = sequence_starts(lengths)
        seq_kept = np.logical_or.reduceat(keep, starts)
        mean = float(weights[starts][seq_kept].mean())
    return weights / mean


def loss_weights(delta: np.ndarray, lengths: np.ndarray, config: CorrectionConfig, keep: np.ndarray) -> np.ndarray:
    """The weight each token's importance-weighted term carries: min(w, C), self-normalized if configured."""
    wt = applied_weights(carried_weights(delta, lengths, config.level), config.cap)
    return self_normalized(wt, keep, lengths, config.level) if config.self_normalize else wt


@dataclass(frozen=True)
class CorrectionOutcome:
    keep: np.ndarray  # bool[N], every mask together
    n_low: int  # tokens below a lower ratio bound (mis 1/C at the carried level, mask_ratio_lo)
    n_high: int  # tokens above an upper ratio bound (mis C at the carried level, mask_ratio_hi)
    n_rejected: int  # tokens dropped by divergence rejection
    n_m2po: int  # tokens M2PO masked among those every other mask kept


def apply_corrections(
    w: np.ndarray,
    lengths: np.ndarray,
    config: CorrectionConfig,
    sequence_keep: np.ndarray | None,
    log_ratios: Callable[[], np.ndarray],
) -> CorrectionOutcome:
    """Every mask of the config (mis, IcePop, rejection, M2PO), with the tokens each reason masks.

    w: float64[N], the carried weights at the config's level. sequence_keep: bool[N] of the sequence
    masks computed by the caller (veto, opsm), or None. log_ratios: returns the clamped per-token
    deltas; called only when a mask needs them (the caller may already hold the weights).
    """
    n = w.size
    token_level = config.level is WeightLevel.TOKEN
    delta: np.ndarray | None = None

    def deltas() -> np.ndarray:
        nonlocal delta
        if delta is None:
            delta = log_ratios()
        return delta

    low = np.zeros(n, dtype=bool)
    high = np.zeros(n, dtype=bool)
    if config.mode is CorrectionMode.MIS:
        lo_w, hi_w = mis_bounds(config.cap)
        low |= w < lo_w
        high |= w > hi_w
    if config.mask_ratio_lo is not None or config.mask_ratio_hi is not None:
        token_ratio = w if token_level else np.exp(deltas())
        if config.mask_ratio_lo is not None:
            low |= token_ratio < config.mask_ratio_lo
        if config.mask_ratio_hi is not None:
            high |= token_ratio > config.mask_ratio_hi
    keep = ~(low | high)
    n_rejected = 0
    if config.reject_rule is not None:
        assert config.reject_threshold is not None  # the config validates the pair
        rejected = reject_drop(deltas(), lengths, config.reject_rule, config.reject_threshold)
        n_rejected = int(np.count_nonzero(rejected))
        keep &= ~rejected
    if sequence_keep is not None:
        keep &= sequence_keep
    n_m2po = 0
    if config.m2po_threshold is not None:
        kept = m2po_keep(deltas(), keep, config.m2po_threshold)
        n_m2po = int(np.count_nonzero(keep)) - int(np.count_nonzero(kept))
        keep = kept
    return CorrectionOutcome(keep, int(np.count_nonzero(low)), int(np.count_nonzero(high)), n_rejected, n_m2po)
