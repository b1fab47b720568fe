"""Settings of the learner (environment prefix AISRL_LEARNER_; CLI options derived).

Invariant: every knob is declared once, with a description and bounds. The correction knobs
reuse `CorrectionConfig`'s own fields (same type, default, bounds and description) under a
`correction_` / `ais_` name and are turned back into one by `correction_config()`, so the learner's
local fallback and the diagnostics service always see the same config.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from aisrl.core.types import CorrectionConfig, CorrectionMode, RejectRule, WeightLevel
from aisrl.settings import CommonSettings, json_object_option
from aisrl.streams import DEFAULT_PREFIX, RUN_ID_PATTERN

_CORR = CorrectionConfig.model_fields


def _field(name: str) -> Any:
    return copy.copy(_CORR[name])


# CorrectionConfig field -> the learner setting that carries it (every field has one; a test checks).
CORRECTION_SETTINGS = {
    "mode": "correction_mode",
    "level": "correction_level",
    "cap": "correction_cap",
    "tau_kl": "ais_tau_kl",
    "beta": "ais_beta",
    "alpha_min": "ais_alpha_min",
    "alpha_max": "ais_alpha_max",
    "fixed_alpha": "fixed_alpha",
    "veto_threshold": "veto_threshold",
    "opsm_kl_threshold": "opsm_kl_threshold",
    "self_normalize": "correction_self_normalize",
    "mask_ratio_lo": "correction_mask_ratio_lo",
    "mask_ratio_hi": "correction_mask_ratio_hi",
    "reject_rule": "correction_reject_rule",
    "reject_threshold": "correction_reject_threshold",
    "m2po_threshold": "correction_m2po_threshold",
}


class LearnerSettings(CommonSettings):
    """Train a BF16 policy with GRPO and the AIS-mixed loss on trajectory groups from rollout workers."""

    model_config = SettingsConfigDict(env_prefix="AISRL_LEARNER_")

    # -- run, model, task
    run_id: str = Field("default", pattern=RUN_ID_PATTERN, description="Run whose streams this learner owns.")
    key_prefix: str = Field(DEFAULT_PREFIX, min_length=1, description="Prefix of the run's Redis stream keys.")
    model_path: str | None = Field(
        None,
        description="Hugging Face checkpoint directory of the initial policy (unset: a random tiny model created in "
        "the work directory from `seed`, as the rollout worker does; demos and tests only).",
    )
    work_dir: str = Field("runs/learner", min_length=1, description="Directory for checkpoints and the tiny model.")
    task: str = Field("countdown", min_length=1, description="Task the prompts come from (aisrl.tasks.get_task).")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description='Task options as JSON, passed to get_task (e.g. {"max_numbers": 3}).'
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the training problems, minibatch order and RNG.")
    max_steps: int = Field(0, ge=0, le=10_000_000, description="Stop after this many optimizer steps (0: run forever).")

    # -- prompts and staleness
    batch_size: int = Field(8, ge=1, le=65_536, description="Trajectory groups (prompts) per training step.")
    group_size: int = Field(8, ge=1, le=4096, description="Completions sampled per prompt (GRPO group size G).")
    max_tokens: int = Field(32, ge=1, le=1_048_576, description="Longest completion a rollout may sample, in tokens.")
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Sampling temperature of rollouts; lp_pi is recomputed at the same one."
    )
    max_staleness: int = Field(
        1,
        ge=0,
        le=1000,
        description="Largest policy-version lag trained on; also bounds admission (AReaL's rule, staleness.py).",
    )
    feed_poll_s: float = Field(0.05, gt=0, le=60, description="Seconds between admission checks while at capacity.")

    # -- optimisation
    lr: float = Field(1e-5, gt=0, le=1.0, description="AdamW learning rate after warmup.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Steps of linear learning-rate warmup.")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Clip the global gradient norm to this (0: no clipping).")
    ppo_epochs: int = Field(1, ge=1, le=100, description="Passes over each batch (PPO epochs).")
    minibatches: int = Field(1, ge=1, le=4096, description="Optimizer updates per epoch (sequences split evenly).")
    micro_batch_size: int = Field(
        64, ge=1, le=65_536, description="Sequences per forward/backward (gradient accumulation inside a minibatch)."
    )
    reuse_forward: bool = Field(
        True,
        description="With ppo_epochs 1 and minibatches 1, compute lp_pi with the update's own forward pass (kept "
        "with its graph until alpha is known) instead of a separate no-grad pass; false trades that pass for memory.",
    )
    share_prompts: bool = Field(
        True,
        description="Run each distinct prompt of a micro-batch through the model once and its samples' completions "
        "on its KV cache (GRPO's G samples share a prompt); false runs every row whole.",
    )
    eps_lo: float = Field(0.2, ge=0, lt=1, description="PPO clip: lower ratio bound 1 - eps_lo.")
    eps_hi: float = Field(0.2, ge=0, le=100, description="PPO clip: upper ratio bound 1 + eps_hi.")
    advantage_std_normalize: bool = Field(True, description="Divide group-centred rewards by the group std (GRPO).")
    compute_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16",
        description="Precision of the forward passes (lp_pi and training; autocast over float32 master weights). "
        "bfloat16 is the BF16 learner of the design; on CPUs without native BF16 it is about 10x slower than float32.",
    )

    # -- correction (same fields as CorrectionConfig)
    correction_mode: CorrectionMode = _field("mode")
    correction_level: WeightLevel = _field("level")
    correction_cap: float | None = _field("cap")
    ais_tau_kl: float = _field("tau_kl")
    ais_beta: float = _field("beta")
    ais_alpha_min: float = _field("alpha_min")
    ais_alpha_max: float = _field("alpha_max")
    fixed_alpha: float = _field("fixed_alpha")
    veto_threshold: float | None = _field("veto_threshold")
    opsm_kl_threshold: float | None = _field("opsm_kl_threshold")
    correction_self_normalize: bool = _field("self_normalize")
    correction_mask_ratio_lo: float | None = _field("mask_ratio_lo")
    correction_mask_ratio_hi: float | None = _field("mask_ratio_hi")
    correction_reject_rule: RejectRule | None = _field("reject_rule")
    correction_reject_threshold: float | None = _field("reject_threshold")
    correction_m2po_threshold: float | None = _field("m2po_threshold")

    # -- diagnostics service
    diagnostics_target: str | None = Field(
        None, description="gRPC host:port of the diagnostics service (unset: alpha is always computed locally)."
    )
    diagnostics_timeout_s: float = Field(
        2.0, gt=0, le=600, description="Deadline of one ComputeCoefficient call; past it alpha is computed locally."
    )

    # -- weights
    grpc_host: str = Field(
        "127.0.0.1", description="Address the Weights gRPC server listens on (0.0.0.0 in containers)."
    )
    grpc_port: int = Field(50061, ge=0, le=65535, description="Weights gRPC port; 0 picks a free port and prints it.")
    advertise_host: str | None = Field(
        None,
        description="Host rollout workers reach the Weights server at (unset: grpc_host, or 127.0.0.1 for 0.0.0.0).",
    )
    weights_keep_versions: int = Field(3, ge=1, le=100, description="Weight versions kept servable (newest ones).")
    weights_stream_maxlen: int = Field(
        1000, ge=10, le=10_000_000, description="Weight notices kept on the run's weights stream (approximate)."
    )
    max_message_mb: int = Field(128, ge=4, le=2048, description="Largest gRPC message sent or accepted, in MiB.")

    # -- trajectories stream
    consumer_group: str = Field("learner", min_length=1, description="Consumer group of the trajectories stream.")
    consumer_name: str = Field(
        "learner",
        min_length=1,
        max_length=200,
        description="Consumer name; keep it stable across restarts so the learner re-reads its own pending groups.",
    )
    read_block_ms: int = Field(500, ge=1, le=60_000, description="Longest wait for new trajectory groups per read.")
    reclaim_idle_ms: int = Field(
        600_000,
        ge=1,
        le=86_400_000,
        description="Groups pending this long on another consumer of the learner group are taken over.",
    )

    # -- checkpoints
    checkpoint_every: int = Field(
        10, ge=1, le=1_000_000, description="Steps between checkpoints; trajectory groups are acked after each."
    )
    checkpoint_keep: int = Field(2, ge=1, le=1000, description="Checkpoints kept on disk (newest ones).")
    resume: bool = Field(True, description="Resume from the newest checkpoint in work_dir when there is one.")

    # -- evaluation
    eval_every: int = Field(0, ge=0, le=1_000_000, description="Steps between held-out evaluations (0: never).")
    eval_size: int = Field(64, ge=1, le=100_000, description="Held-out problems per evaluation.")
    eval_samples: int = Field(4, ge=0, le=256, description="Sampled completions per problem for sampled accuracy.")

    # -- HTTP
    http_host: str = Field("127.0.0.1", description="Address of /healthz, /readyz, /metrics (0.0.0.0 in containers).")
    http_port: int = Field(8070, ge=0, le=65535, description="HTTP port; 0 picks a free port and prints it.")
    embedded_redis_dir: str | None = Field(
        None,
        description="Where the embedded Redis keeps its append-only file when no Redis URL is set "
        "(unset: a temporary directory, streams lost on exit).",
    )

    @field_validator("task_options", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        return json_object_option(value, "task_options")

    @model_validator(mode="after")
    def _check(self) -> LearnerSettings:
        self.correction_config()  # raises naming the bad combination (e.g. alpha_min > alpha_max)
        return self

    def correction_config(self) -> CorrectionConfig:
        try:
            return CorrectionConfig(**{name: getattr(self, setting) for name, setting in CORRECTION_SETTINGS.items()})
        except ValidationError as exc:  # name the learner's own setting, not the core field
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else ""
            message = err.get("ctx", {}).get("error", err["msg"])  # without pydantic's "Value error, " prefix
            raise ValueError(f"{CORRECTION_SETTINGS.get(name, 'correction')}: {message}") from None

    def weights_endpoint(self, port: int) -> str:
        """host:port that rollout workers fetch weights from."""
        host = self.advertise_host or ("127.0.0.1" if self.grpc_host in ("0.0.0.0", "::", "") else self.grpc_host)
        return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
