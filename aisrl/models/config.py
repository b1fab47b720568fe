"""Configuration of model creation: the tiny model's shape and the warm-start settings.

Invariant: pydantic only (no torch), so the command line can derive its options from these
classes without importing the heavy parts; every field has a description and bounds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aisrl.models.quant.names import KV_CACHE_DTYPES, PRECISIONS
from aisrl.models.tokenizer import MAX_LENGTH
from aisrl.settings import json_object_option


class TinyModelConfig(BaseModel):
    """Shape of a tiny Llama; the vocabulary is the character tokenizer's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(128, ge=8, le=8192, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, le=64, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, le=64, description="Attention heads (key/value heads too: no GQA).")
    intermediate_size: int = Field(512, ge=8, le=32768, description="Width of the SwiGLU MLP.")
    max_positions: int = Field(MAX_LENGTH, ge=16, le=32768, description="Longest prompt + completion, in tokens.")
    init_std: float = Field(0.02, gt=0.0, le=1.0, description="Standard deviation of the random initial weights.")


class WarmStartSettings(BaseSettings):
    """Create a tiny model and warm-start it on a task's reference solutions (`aisrl model init`)."""

    model_config = SettingsConfigDict(env_prefix="AISRL_MODEL_", extra="forbid", validate_default=True)

    task: str = Field("countdown", description="Task name: countdown, sudoku, arithmetic or gsm8k.")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description='Task options as JSON, passed to get_task (e.g. {"max_numbers": 3}).'
    )
    out: str = Field(
        "runs/model", min_length=1, description="Directory the model (HF format) and warmstart.json go to."
    )
    seed: int = Field(0, ge=0, description="Seed of the initial weights and of the training problems.")
    steps: int = Field(600, ge=0, le=1_000_000, description="Optimizer steps (0: save the random model).")
    batch_size: int = Field(64, ge=1, le=4096, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    warmup_steps: int = Field(50, ge=0, description="Steps of linear learning-rate warmup.")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay.")
    eval_size: int = Field(200, ge=0, le=100_000, description="Held-out problems for greedy accuracy (0: skip).")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Longest greedy answer at evaluation, in tokens.")
    hidden_size: int = Field(TinyModelConfig().hidden_size, ge=8, le=8192, description="Model width.")
    num_layers: int = Field(TinyModelConfig().num_layers, ge=1, le=64, description="Transformer blocks.")
    num_heads: int = Field(TinyModelConfig().num_heads, ge=1, le=64, description="Attention heads.")
    intermediate_size: int = Field(TinyModelConfig().intermediate_size, ge=8, le=32768, description="MLP width.")
    max_positions: int = Field(TinyModelConfig().max_positions, ge=16, le=32768, description="Context in tokens.")
    log_every: int = Field(50, ge=1, description="Steps between loss updates on the progress bar.")

    @field_validator("task_options", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        return json_object_option(value, "task_options")

    def model_shape(self) -> TinyModelConfig:
        return TinyModelConfig(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_positions=self.max_positions,
        )


DEFAULT_MISMATCH_RUNS = (
    "bf16,fp8_w8,fp8_w8a8,fp8_e5m2_w8,fp8_e5m2_w8a8,mxfp4_w4,mxfp4_w4a4,nvfp4_w4,nvfp4_w4a4,"
    "bf16+fp8_e4m3,bf16+fp8_e5m2,fp8_w8a8+fp8_e4m3"
)


class MismatchSettings(BaseSettings):
    """Measure the rollout/learner mismatch of each precision scheme on a model (`aisrl model mismatch`)."""

    model_config = SettingsConfigDict(env_prefix="AISRL_MISMATCH_", extra="forbid", validate_default=True)

    model: str = Field("runs/models/countdown-tiny", min_length=1, description="HF checkpoint directory to measure.")
    task: str = Field("countdown", description="Task whose held-out problems are the prompts.")
    runs: str = Field(
        DEFAULT_MISMATCH_RUNS,
        min_length=1,
        description="Comma-separated rollout settings to measure, each a precision optionally with '+KV cache "
        "dtype' (e.g. nvfp4_w4a4+fp8_e5m2).",
    )
    prompts: int = Field(64, ge=1, le=100_000, description="Held-out prompts sampled per run.")
    group_size: int = Field(8, ge=1, le=1024, description="Completions per prompt (the GRPO group).")
    max_tokens: int = Field(48, ge=1, le=4096, description="Longest completion, in tokens.")
    temperature: float = Field(
        1.0, gt=0, le=10, description="Sampling temperature (logprobs are of the tempered policy)."
    )
    seed: int = Field(0, ge=0, description="Sampling seed: every run samples with the same seeds.")
    compute_dtype: str = Field(
        "bfloat16", pattern="^(bfloat16|float32)$", description="Rollout engine compute dtype (the learner: float32)."
    )
    fp8_granularity: str = Field(
        "tensor", pattern="^(tensor|channel|block)$", description="FP8 weight-scale granularity."
    )
    out: str | None = Field(None, description="Also write the results as JSON to this file.")

    @field_validator("runs")
    @classmethod
    def _check_runs(cls, value: str) -> str:
        for run in value.split(","):
            precision, _, kv = run.strip().partition("+")
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r} in {run!r} (one of {', '.join(PRECISIONS)})")
            if kv and kv not in KV_CACHE_DTYPES:
                raise ValueError(f"unknown KV cache dtype {kv!r} in {run!r} (one of {', '.join(KV_CACHE_DTYPES)})")
        return value

    def run_list(self) -> list[tuple[str, str]]:
        """(precision, kv_cache_dtype) of each run, in order."""
        pairs = [run.strip().partition("+") for run in self.runs.split(",")]
        return [(p, kv or "auto") for p, _, kv in pairs]
