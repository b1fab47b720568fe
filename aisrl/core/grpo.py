"""GRPO pieces of the learner: group-normalized advantages and the AIS-mixed PPO-clip loss.

Invariant: the loss is linear in the per-token coefficient c, which is detached (as are the old
logprobs and the advantages), so with c = (1 - alpha) + alpha * wt its gradient is exactly
(1 - alpha) * g_PG + alpha * g_IS, where g_PG is the gradient with c = 1 and g_IS the one with
c = wt (docs/ais.md). The loss is divided by the PRE-mask token count: a masked token (c = 0)
drops its own term and leaves the weight of every other token unchanged, so masking never
up-weights the survivors (the convention of slime and AReaL).

    L = -(1 / denominator) * sum_i c_i * min(r_i * A_i, clip(r_i, 1 - eps_lo, 1 + eps_hi) * A_i)
    r_i = exp(lp_theta_i - lp_old_i)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aisrl.core.types import BatchValidationError


def group_advantages(rewards: np.ndarray, std_normalize: bool = True, eps: float = 1e-6) -> np.ndarray:
    """GRPO advantages: each reward minus its group's mean, divided by (group std + eps).

    rewards: float[G] (one group) or float[..., G] (groups along the last axis). The std is the
    population std (ddof = 0): it is defined for a group of one, and the advantages of a group
    have unit mean square up to eps. (TRL and verl use torch.std, ddof = 1, which is larger by
    sqrt(G / (G - 1)).) A group whose rewards are all equal gets exact zeros, with no division
    by a near-zero std. Non-finite rewards raise BatchValidationError('rewards', ...).
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim == 0 or r.shape[-1] == 0:
        raise BatchValidationError("rewards", f"need at least one reward per group, got shape {r.shape}")
    if not np.isfinite(r).all():
        k = int(np.flatnonzero(~np.isfinite(r.ravel()))[0])
        raise BatchValidationError("rewards", f"non-finite reward at flat index {k}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    centered = r - r.mean(axis=-1, keepdims=True)
    # The mean of equal values may differ from them in the last bit: force exact zeros.
    constant = r.max(axis=-1, keepdims=True) == r.min(axis=-1, keepdims=True)
    centered = np.where(constant, 0.0, centered)
    if not std_normalize:
        return centered
    std = np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True))
    scale = std + eps
    # eps = 0 with a constant group: 0 / 0 is avoided, the advantages are already exact zeros.
    return np.divide(centered, scale, out=np.zeros_like(centered), where=scale > 0.0)


def expand_to_tokens(
    per_seq: np.ndarray | torch.Tensor, lengths: np.ndarray | torch.Tensor
) -> np.ndarray | torch.Tensor:
    """Repeats each sequence's value over its tokens (numpy in, numpy out; torch in, torch out)."""
    n_seq = per_seq.shape[0]
    if len(lengths) != n_seq:
        raise BatchValidationError("lengths", f"has {len(lengths)} entries for {n_seq} sequences")
    if isinstance(per_seq, torch.Tensor):
        counts = torch.as_tensor(lengths, dtype=torch.long, device=per_seq.device)
        if bool((counts < 0).any()):
            raise BatchValidationError("lengths", "lengths must be >= 0")
        return torch.repeat_interleave(per_seq, counts, dim=0)
    counts = np.asarray(lengths)
    if (counts < 0).any():
        raise BatchValidationError("lengths", "lengths must be >= 0")
    return np.repeat(np.asarray(per_seq), counts, axis=0)


def _detached(value: np.ndarray | torch.Tensor, like: torch.Tensor, field: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()
    if tensor.shape != like.shape:
        raise BatchValidationError(field, f"has shape {tuple(tensor.shape)} but lp_theta has {tuple(like.shape)}")
    return tensor


def _clipped_surrogate(
    lp_theta: torch.Tensor, lp_old: torch.Tensor, adv: torch.Tensor, eps_lo: float, eps_hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    ratio = torch.exp(lp_theta - lp_old)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi) * adv)
    return surrogate, ratio


def mixed_ppo_loss(
    lp_theta: torch.Tensor,
    lp_old: np.ndarray | torch.Tensor,
    token_advantages: np.ndarray | torch.Tensor,
    token_coef: np.ndarray | torch.Tensor,
    denominator: float,
    eps_lo: float = 0.2,
    eps_hi: float = 0.2,
) -> torch.Tensor:
    """The scalar AIS-mixed PPO-clip loss of the module docstring (a 0-d tensor with grad).

    lp_theta: per-token logprobs under the parameters being optimized (with grad), float[N].
    lp_old: the learner's logprobs before the update (lp_pi of the mismatch batch); detached.
    token_advantages: A_i, the sequence advantage on each token; detached.
    token_coef: c_i from compute_coefficient (0 on masked tokens); detached.
    denominator: the pre-mask token count (e.g. the batch's n_tokens), > 0.
    """
    if lp_theta.ndim != 1:
        raise BatchValidationError("lp_theta", f"must be one-dimensional, got shape {tuple(lp_theta.shape)}")
    if not denominator > 0:
        raise BatchValidationError("denominator", f"must be > 0 (the pre-mask token count), got {denominator}")
    if not (0.0 <= eps_lo < 1.0 and eps_hi >= 0.0):
        raise ValueError(f"need 0 <= eps_lo < 1 and eps_hi >= 0, got {eps_lo}, {eps_hi}")
    old = _detached(lp_old, lp_theta, "lp_old")
    adv = _detached(token_advantages, lp_theta, "token_advantages")
    coef = _detached(token_coef, lp_theta, "token_coef")
    surrogate, _ = _clipped_surrogate(lp_theta, old, adv, eps_lo, eps_hi)
    return -(coef * surrogate).sum() / denominator


@dataclass(frozen=True)
class PPOStats:
    """Statistics of a PPO step over the kept tokens (c > 0); neutral values when none is kept."""

    n_kept: int
    clip_fraction: float  # share of kept tokens whose clipped branch is active (no gradient)
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    approx_kl: float  # mean(r - 1 - log r), the k3 estimate of KL(old || theta)


def ppo_stats(
    lp_theta: torch.Tensor,
    lp_old: np.ndarray | torch.Tensor,
    token_advantages: np.ndarray | torch.Tensor,
    token_coef: np.ndarray | torch.Tensor,
    eps_lo: float = 0.2,
    eps_hi: float = 0.2,
) -> PPOStats:
    """Clip fraction and ratio statistics of the loss above, without grad."""
    with torch.no_grad():
        theta = lp_theta.detach()
        old = _detached(lp_old, theta, "lp_old")
        adv = _detached(token_advantages, theta, "token_advantages")
        kept = _detached(token_coef, theta, "token_coef") > 0
        n_kept = int(kept.sum())
        if n_kept == 0:
            return PPOStats(0, 0.0, 1.0, 1.0, 1.0, 0.0)
        log_ratio = (theta - old)[kept]
        ratio = torch.exp(log_ratio)
        a = adv[kept]
        clipped = ((a > 0) & (ratio > 1.0 + eps_hi)) | ((a < 0) & (ratio < 1.0 - eps_lo))
        return PPOStats(
            n_kept=n_kept,
            clip_fraction=float(clipped.double().mean()),
            ratio_mean=float(ratio.double().mean()),
            ratio_min=float(ratio.min()),
            ratio_max=float(ratio.max()),
            approx_kl=float((ratio - 1.0 - log_ratio).double().mean()),
        )
