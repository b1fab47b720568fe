"""Value types of the AIS core: the correction config, a mismatch batch, and a result.

Invariant: these types carry data only. Every computation lives in pure functions
(`aisrl.core.ais`, `aisrl.core.grpo`); every service converts its wire format into
these types before calling them, so one formulation serves REST, gRPC and the
learner's local fallback.

Ragged batches are packed: per-token arrays are flat and concatenated over the
sequences; `lengths[s]` tokens belong to sequence s, in order. Only valid
response tokens are carried (the mask is implicit: every carried token counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# delta = lp_pi - lp_mu is clamped to this range before exponentiation (docs/ais.md).
LOG_RATIO_CLAMP = 20.0


class CorrectionMode(StrEnum):
    """How the loss corrects for the rollout/training mismatch."""

    NONE = "none"  # alpha = 0: the uncorrected policy gradient
    TIS = "tis"  # alpha = 1 with truncated weights min(w, C)
    MIS = "mis"  # alpha = 1, tokens/sequences with w outside [1/C, C] masked out
    FIXED = "fixed"  # a constant alpha (fixed_alpha)
    AIS = "ais"  # alpha from the three diagnostics, per batch


class WeightLevel(StrEnum):
    """Granularity of the importance weight."""

    TOKEN = "token"  # w_i = exp(delta_i)
    SEQUENCE = "sequence"  # w_s = exp(clamp(sum_s delta, -20, 20)), carried by every token of s
    GEOMETRIC = "geometric"  # w_s = exp(mean_s delta), carried by every token of s


class RejectRule(StrEnum):
    """Divergence rejection (verl's rollout-correction RS options): aggregation _ estimator.

    Token divergences of delta = log(pi/mu): k1 = -delta, k2 = delta^2 / 2, k3 = exp(delta) - 1 - delta.
    `token_*` judge each token, `seq_sum_*` / `seq_mean_*` / `seq_max_*` the sum, mean or max over a
    sequence and drop the whole sequence. k1 is signed, so its rules drop |aggregate| > threshold.
    """

    TOKEN_K1 = "token_k1"
    TOKEN_K2 = "token_k2"
    TOKEN_K3 = "token_k3"
    SEQ_SUM_K1 = "seq_sum_k1"
    SEQ_SUM_K2 = "seq_sum_k2"
    SEQ_SUM_K3 = "seq_sum_k3"
    SEQ_MEAN_K1 = "seq_mean_k1"
    SEQ_MEAN_K2 = "seq_mean_k2"
    SEQ_MEAN_K3 = "seq_mean_k3"
    SEQ_MAX_K2 = "seq_max_k2"
    SEQ_MAX_K3 = "seq_max_k3"

    @property
    def aggregation(self) -> str:
        """token, sum, mean or max."""
        head = self.value.rsplit("_", 1)[0]
        return "token" if head == "token" else head.removeprefix("seq_")

    @property
    def estimator(self) -> str:
        """k1, k2 or k3."""
        return self.value.rsplit("_", 1)[1]


class CorrectionConfig(BaseModel):
    """Every knob of the correction. Defaults are those of docs/ais.md."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False, allow_inf_nan=False)

    mode: CorrectionMode = Field(CorrectionMode.AIS, description="Correction mode: none, tis, mis, fixed or ais.")
    level: WeightLevel = Field(WeightLevel.TOKEN, description="Importance-weight level: token, sequence or geometric.")
    cap: float | None = Field(
        2.0,
        gt=0.0,
        description="Truncation cap C on importance weights (null: no cap). mis keeps weights in [1/C, C] "
        "(everything without a cap).",
    )
    tau_kl: float = Field(1e-3, gt=0.0, description="KL temperature: severity s = 1 - exp(-kl / tau_kl).")
    beta: float = Field(
        0.0, ge=0.0, lt=1.0, description="EMA factor on alpha_raw across a run's batches (0: purely per batch)."
    )
    alpha_min: float = Field(0.0, ge=0.0, le=1.0, description="Lower bound on alpha (ais mode).")
    alpha_max: float = Field(1.0, ge=0.0, le=1.0, description="Upper bound on alpha (ais mode).")
    fixed_alpha: float = Field(0.5, ge=0.0, le=1.0, description="The constant alpha of fixed mode.")
    veto_threshold: float | None = Field(
        None,
        gt=0.0,
        description="If set, drop every sequence containing a token whose token-level weight is below it.",
    )
    opsm_kl_threshold: float | None = Field(
        None,
        ge=0.0,
        description=(
            "If set, off-policy sequence masking (DeepSeek-V3.2): drop sequences with negative advantage "
            "whose mean per-token log(mu/pi) exceeds it."
        ),
    )

    # -- composable corrections (docs/corrections.md): a weighting (mode, level, cap, self_normalize)
    # and any set of masks (mis, veto, opsm and the four below), each independent of alpha.
    self_normalize: bool = Field(
        False,
        description="Self-normalized IS: divide the applied weights by their mean over the kept tokens (sequence "
        "levels: over the kept sequences), after the cap.",
    )
    mask_ratio_lo: float | None = Field(
        None,
        ge=0.0,
        description="IcePop lower bound: mask tokens whose token ratio pi/mu is below it (null: no lower bound).",
    )
    mask_ratio_hi: float | None = Field(
        None,
        gt=0.0,
        description="IcePop upper bound: mask tokens whose token ratio pi/mu is above it (null: no upper bound).",
    )
    reject_rule: RejectRule | None = Field(
        None,
        description="Divergence rejection (verl's rollout_rs options): token_k1|k2|k3, seq_sum_k1|k2|k3, "
        "seq_mean_k1|k2|k3, seq_max_k2|k3 (null: none).",
    )
    reject_threshold: float | None = Field(
        None,
        ge=0.0,
        validate_default=True,
        description="Drop tokens or sequences whose divergence under reject_rule exceeds it.",
    )
    m2po_threshold: float | None = Field(
        None,
        ge=0.0,
        description="M2PO: mask the tokens with the largest delta^2 until the mean delta^2 of the kept tokens is at "
        "most this (null: off).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> CorrectionConfig:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must not exceed alpha_max ({self.alpha_max})")
        return self

    # Cross-field checks as field validators, so the error's location names the field.
    @field_validator("mask_ratio_hi")
    @classmethod
    def _check_ratio_bounds(cls, hi: float | None, info: ValidationInfo) -> float | None:
        lo = info.data.get("mask_ratio_lo")
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"must be above mask_ratio_lo ({lo}), got {hi} (bounds reversed?)")
        return hi

    @field_validator("reject_threshold")
    @classmethod
    def _check_reject_pair(cls, threshold: float | None, info: ValidationInfo) -> float | None:
        rule = info.data.get("reject_rule")
        if rule is not None and threshold is None:
            raise ValueError(f"required when reject_rule is set ({rule})")
        if rule is None and threshold is not None and "reject_rule" in info.data:
            raise ValueError("set without reject_rule")
        return threshold


class BatchValidationError(ValueError):
    """A mismatch batch that cannot be computed on; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class MismatchArrays:
    """One batch of per-token logprobs of both policies, packed over sequences.

    lp_pi:      float64[N], log pi(y_i | ctx), learner (BF16) logprobs, no grad.
    lp_mu:      float64[N], log mu(y_i | ctx), rollout-engine logprobs.
    lengths:    int64[S], tokens per sequence, each >= 1, summing to N.
    advantages: float64[S], the GRPO advantage of each sequence.
    """

    lp_pi: np.ndarray
    lp_mu: np.ndarray
    lengths: np.ndarray
    advantages: np.ndarray


@dataclass(frozen=True)
class WeightStats:
    """Diagnostics of one set of per-token (carried) weights."""

    reliability: float  # rho = ESS / N
    ess: float  # (sum w)^2 / sum w^2
    variance_amplification: float  # v = sum (w A)^2 / sum A^2 (1 when every A is 0)
    penalty: float  # p = min(1, 1 / v)
    weight_mean: float
    weight_min: float
    weight_max: float


def _stat(doc: str) -> Any:
    return field(metadata={"doc": doc})


@dataclass(frozen=True)
class CorrectionStats:
    """Diagnostics of the composable corrections, reported for every batch in every mode.

    This dataclass is the one declaration of these fields: the REST schema, the Prometheus gauges and
    the flat record derive from it (the proto mirrors it, checked by a test).
    """

    frac_mask_low: float = _stat("Share of tokens masked for a ratio below the lower bound (mis 1/C, mask_ratio_lo).")
    frac_mask_high: float = _stat("Share of tokens masked for a ratio above the upper bound (mis C, mask_ratio_hi).")
    frac_rejected: float = _stat("Share of tokens dropped by divergence rejection (reject_rule).")
    frac_m2po: float = _stat("Share of tokens masked by M2PO's second-moment rule.")
    frac_kept: float = _stat("Share of tokens that stay in the loss after every mask.")
    weight_std: float = _stat("Standard deviation of the per-token weights the loss applies, over kept tokens.")
    loss_weight_mean: float = _stat("Mean of the per-token weights the loss applies, over kept tokens (1 if SNIS).")
    ess_sequence: float = _stat("Sequence-level ESS (sum w_s)^2 / sum w_s^2 of w_s = exp(clamp(sum_s delta)).")
    m2: float = _stat("Second moment of the log ratio, mean(delta^2) over every token (M2PO's M2).")


CORRECTION_STAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(CorrectionStats))


@dataclass(frozen=True)
class CoefficientResult:
    """Everything computed for one batch. Scalars are reported; arrays feed the learner's loss.

    `applied` holds the statistics of the applied (truncated) weights wt = min(w, C); `raw`
    the same statistics of the untruncated weights. `reliability`, `ess`,
    `variance_amplification` and `penalty` mirror `applied` for convenience.
    """

    mode: CorrectionMode
    level: WeightLevel
    n_tokens: int
    n_sequences: int
    alpha: float  # the coefficient the loss uses in this mode
    alpha_raw: float  # s * rho * p, what AIS computes before smoothing and bounds (every mode)
    alpha_ema: float  # ema(alpha_raw) before clipping; the state carried to the next batch
    alpha_ais: float  # clip(alpha_ema, alpha_min, alpha_max): what ais mode would use
    kl: float  # k3 estimator, mean(exp(delta) - 1 - delta) over tokens
    severity: float  # s = 1 - exp(-kl / tau_kl)
    applied: WeightStats
    raw: WeightStats
    kl_k1: float  # mean(lp_mu - lp_pi), the k1 estimator of KL(mu || pi)
    chi2_token: float  # mean(w_token^2) - 1 on raw token-level weights
    chi2_sequence: float  # mean over sequences of w_seq^2 - 1 (clamped sequence weights)
    ppl_ratio: float  # training / rollout perplexity = exp(mean(lp_mu - lp_pi))
    frac_truncated: float  # fraction of tokens whose carried weight exceeds C
    frac_masked: float  # fraction of tokens removed from the loss (mis, veto, opsm together)
    frac_vetoed: float  # fraction of tokens in sequences dropped by the veto
    frac_opsm: float  # fraction of tokens in sequences dropped by off-policy sequence masking
    corrections: CorrectionStats  # the composable corrections' diagnostics (masks by reason, weights)
    warnings: tuple[str, ...]  # health thresholds crossed (ESS/N < 0.3, mean w outside [0.5, 2], ...)
    token_coef: np.ndarray = field(repr=False)  # float64[N]: c_i = (1 - alpha) + alpha * wt_i (0 where masked)
    token_keep: np.ndarray = field(repr=False)  # bool[N]: token kept in the loss

    @property
    def reliability(self) -> float:
        return self.applied.reliability

    @property
    def ess(self) -> float:
        return self.applied.ess

    @property
    def variance_amplification(self) -> float:
        return self.applied.variance_amplification

    @property
    def penalty(self) -> float:
        return self.applied.penalty
