"""REST request and response bodies of the diagnostics service (they are its OpenAPI schema).

Invariant: the stateless config accepts exactly the fields of `CorrectionConfig` except `beta`
(smoothing belongs to a recorded run, not to one stateless call); unknown fields are rejected
rather than ignored, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields as dataclass_fields
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictFloat, create_model

from aisrl.core.types import CorrectionConfig, CorrectionStats


def _strict_scalars(annotation: Any) -> Any:
    """Numbers and booleans of a config field are taken strictly: "2.0" is not a number, true is not 1."""
    if annotation in (float, int, bool):
        return Annotated[annotation, Strict()]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_strict_scalars(a) for a in typing.get_args(annotation))]  # noqa: UP007
    return annotation


CoefficientConfigIn = create_model(
    "CoefficientConfig",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Correction config of a stateless call; every field optional, defaults as in docs/ais.md.",
    **{
        name: (_strict_scalars(info.annotation), info)
        for name, info in CorrectionConfig.model_fields.items()
        if name != "beta"
    },
)


class CoefficientRequest(BaseModel):
    """One batch: per-sequence lists of per-token logprobs of both policies and one advantage per sequence."""

    model_config = ConfigDict(extra="forbid")

    # Strict numbers: a string or a boolean where a number belongs is an error, not silently converted.
    lp_pi: list[list[StrictFloat]] = Field(description="log pi per token (learner, BF16), one inner list per sequence.")
    lp_mu: list[list[StrictFloat]] = Field(description="log mu per token (rollout engine), same shape as lp_pi.")
    advantages: list[StrictFloat] = Field(description="GRPO advantage of each sequence.")
    config: CoefficientConfigIn = Field(default_factory=CoefficientConfigIn)  # type: ignore[valid-type]


class WeightStatsOut(BaseModel):
    reliability: float = Field(description="rho = ESS / N")
    ess: float = Field(description="(sum w)^2 / sum w^2")
    variance_amplification: float = Field(description="v = sum (w A)^2 / sum A^2 (1 when every A is 0)")
    penalty: float = Field(description="p = min(1, 1 / v)")
    weight_mean: float
    weight_min: float
    weight_max: float


class _CoefficientFields(BaseModel):
    mode: str
    level: str
    n_tokens: int
    n_sequences: int
    alpha: float = Field(description="Coefficient the loss uses in this mode.")
    alpha_raw: float = Field(description="s * rho * p, before smoothing and bounds (computed in every mode).")
    alpha_ema: float = Field(description="EMA of alpha_raw (equals alpha_raw without smoothing).")
    alpha_ais: float = Field(
        description="Shadow alpha: clip(alpha_ema, alpha_min, alpha_max), what ais mode uses (computed in every mode)."
    )
    reliability: float = Field(description="rho = ESS / N on the applied weights.")
    ess: float
    severity: float = Field(description="s = 1 - exp(-kl / tau_kl).")
    kl: float = Field(description="k3 estimate mean(exp(delta) - 1 - delta).")
    variance_amplification: float
    penalty: float
    applied: WeightStatsOut
    raw: WeightStatsOut = Field(description="The same statistics on the untruncated weights.")
    kl_k1: float
    chi2_token: float
    chi2_sequence: float
    ppl_ratio: float
    frac_truncated: float
    frac_masked: float
    frac_vetoed: float
    frac_opsm: float
    warnings: list[str]
    compute_ms: float


CoefficientOut = create_model(
    "CoefficientOut",
    __base__=_CoefficientFields,
    __doc__="The coefficient and every diagnostic; top-level statistics are on the applied (truncated) weights.",
    # null in records written before these fields existed (a history may span an upgrade)
    **{f.name: (float | None, Field(None, description=f.metadata["doc"])) for f in dataclass_fields(CorrectionStats)},
)


class BatchRecordOut(CoefficientOut):  # type: ignore[valid-type,misc]
    """A batch recorded under a run."""

    run_id: str
    step: int
    policy_version: int
    computed_unix: float
    computed_locally: bool
    config: dict[str, Any]
    # What the learner sent with the batch; null when it did not (no evaluation at this step, an older learner,
    # or a record written before these fields existed).
    reward_mean: float | None = Field(None, description="Mean training reward of the batch's completions.")
    eval_step: int | None = Field(
        None, description="Step after which the learner ran the held-out evaluation reported here (null: none)."
    )
    accuracy_greedy: float | None = Field(None, description="Held-out accuracy, greedy decoding (share solved).")
    accuracy_sampled: float | None = Field(
        None, description="Held-out accuracy, sampled at the eval temperature (share of samples that solve)."
    )


class RunOut(BaseModel):
    run_id: str
    n_batches: int
    first_step: int | None
    latest_step: int | None
    updated_unix: float
    trimmed: int = Field(description="Records removed by the history limit.")


class BatchPageOut(BaseModel):
    run_id: str
    batches: list[BatchRecordOut]
    next_since_step: int | None = Field(description="Pass as since_step to get the next page; null at the end.")


class SeriesOut(BaseModel):
    """A run's charted fields over steps, downsampled to at most max_points (every `stride`-th batch)."""

    run_id: str
    total: int = Field(description="Batches the run holds.")
    loaded: int = Field(description="Newest batches the series was drawn from.")
    shown: int = Field(description="Points per series.")
    stride: int = Field(description="Every stride-th loaded batch is shown (1: all), the latest always.")
    updated_unix: float | None
    steps: list[int]
    fields: dict[str, list[float | None]] = Field(description="Per charted field, one value per step (null: none).")
    eval_steps: list[int] = Field(
        description="Steps of the held-out evaluations among the loaded batches (every one: never downsampled)."
    )
    evaluations: dict[str, list[float | None]] = Field(
        description="accuracy_greedy and accuracy_sampled, one value per eval step (null: not measured)."
    )
    latest: dict[str, float | None] = Field(description="The latest batch's tabled fields.")
    latest_step: int | None
    mode: str | None
    level: str | None
    warnings: list[str]


class ErrorOut(BaseModel):
    error: str = Field(description="What is wrong, naming the field.")
    field: str | None = Field(None, description="Path of the offending field, e.g. lp_mu[3][0] or config.cap.")
    detail: list[dict[str, Any]] = Field(
        default_factory=list, description="Every problem found: {field, msg, type}, field paths as in `field`."
    )
