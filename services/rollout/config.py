"""Settings of the rollout worker (environment prefix AISRL_ROLLOUT_; CLI options derived).

Invariant: every knob is declared once. Engine knobs are taken from `EngineConfig` (same type,
default, bounds and description) and turned back into one by `engine_config()`.
"""

from __future__ import annotations

import copy
import os
import secrets
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from aisrl.models.quant.names import KvCacheDtype
from aisrl.services.rollout.engine import EngineConfig, Fp8Granularity, Precision
from aisrl.settings import CommonSettings
from aisrl.streams import DEFAULT_PREFIX, RUN_ID_PATTERN

_ENGINE = EngineConfig.model_fields


def default_worker_id() -> str:
    """hostname-pid-random: unique per process, readable in logs and in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RolloutSettings(CommonSettings):
    """Sample G completions per prompt job, score them, and append trajectory groups to the run's stream."""

    model_config = SettingsConfigDict(env_prefix="AISRL_ROLLOUT_")

    run_id: str = Field("default", pattern=RUN_ID_PATTERN, description="Run whose streams this worker serves.")
    key_prefix: str = Field(DEFAULT_PREFIX, min_length=1, description="Prefix of the run's Redis stream keys.")
    model_path: str | None = Field(
        None,
        description="Hugging Face checkpoint directory to sample from (unset: a random tiny model is created in "
        "the work directory; for demos and tests only).",
    )
    model_id: str | None = Field(None, description="Model name reported in each group (unset: the model folder name).")
    engine: Literal["vllm", "hf"] = Field("vllm", description="Sampling backend: vllm, or hf (transformers).")
    precision: Precision = copy.copy(_ENGINE["precision"])
    fp8_granularity: Fp8Granularity = copy.copy(_ENGINE["fp8_granularity"])
    kv_cache_dtype: KvCacheDtype = copy.copy(_ENGINE["kv_cache_dtype"])
    quantize_lm_head: bool = copy.copy(_ENGINE["quantize_lm_head"])
    compute_dtype: Literal["bfloat16", "float32"] = copy.copy(_ENGINE["compute_dtype"])
    seed: int = copy.copy(_ENGINE["seed"])
    max_model_len: int | None = copy.copy(_ENGINE["max_model_len"])
    kv_cache_gb: float | None = copy.copy(_ENGINE["kv_cache_gb"])
    enforce_eager: bool | None = copy.copy(_ENGINE["enforce_eager"])
    in_process: bool = copy.copy(_ENGINE["in_process"])
    work_dir: str | None = Field(
        None,
        description="Scratch directory: fetched weight versions, the tiny model "
        "(unset: a temporary directory removed on exit).",
    )
    worker_id: str = Field(
        default_factory=default_worker_id,
        min_length=1,
        max_length=200,
        description="Consumer name in the prompts group; unique per replica (default: hostname-pid-random).",
    )
    consumer_group: str = Field("rollout", min_length=1, description="Consumer group of the prompts stream.")
    batch_size: int = Field(8, ge=1, le=4096, description="Prompt jobs per engine call.")
    block_ms: int = Field(1000, ge=1, le=60_000, description="Longest wait for new prompt jobs per read, in ms.")
    reclaim_idle_ms: int = Field(
        60_000,
        ge=1,
        le=86_400_000,
        description="A job pending this long on another consumer is taken over (its worker is presumed dead); "
        "keep it well above the longest batch.",
    )
    reclaim_interval_s: float = Field(
        5.0, ge=0, le=3600, description="Seconds between scans for idle pending jobs (0: before every batch)."
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        le=1000,
        description="A job is dead-lettered once this many attempts to sample it never ended (a worker crashed or "
        "was killed on it); re-reads after a restart and takeovers do not count.",
    )
    max_group_size: int = Field(256, ge=1, le=65_536, description="Largest group_size accepted in a job.")
    max_tokens_limit: int = Field(8192, ge=1, le=1_048_576, description="Largest max_tokens accepted in a job.")
    max_trajectories_backlog: int = Field(
        1024,
        ge=0,
        le=10_000_000,
        description="Wait before reading more jobs while this many trajectory groups are unconsumed (0: no limit).",
    )
    backpressure_poll_s: float = Field(
        0.5, gt=0, le=60, description="Seconds between backlog checks while waiting on backpressure."
    )
    initial_version: int = Field(0, ge=0, description="Policy version of model_path (before any notice).")
    weights_fetch_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="Deadline of one weight fetch (the whole gRPC stream), in seconds."
    )
    weights_retry_base_s: float = Field(
        1.0, gt=0, le=3600, description="First retry delay after a failed fetch; doubles per failure."
    )
    weights_retry_max_s: float = Field(60.0, gt=0, le=86_400, description="Longest delay between fetch retries.")
    weights_chunk_bytes: int = Field(
        4 << 20, ge=1024, le=64 << 20, description="Preferred weight chunk size asked from the server, in bytes."
    )
    max_message_mb: int = Field(128, ge=4, le=2048, description="Largest gRPC message accepted, in MiB.")
    catch_up_timeout_s: float = Field(
        300.0,
        ge=0,
        le=86_400,
        description="At start, how long to wait for the latest announced weights before sampling (0: don't wait).",
    )
    version_wait_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Before sampling a batch whose jobs require a newer policy version than loaded "
        "(min_policy_version), how long to wait for the weights follower to fetch it; on timeout the batch is "
        "sampled with the loaded weights (0: don't wait). Keep it well below reclaim_idle_ms.",
    )
    shutdown_grace_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="After SIGTERM, how long the current batch may run to completion before it is released.",
    )
    http_host: str = Field("127.0.0.1", description="Address of /healthz, /readyz, /metrics (0.0.0.0 in containers).")
    http_port: int = Field(8090, ge=0, le=65535, description="HTTP port; 0 picks a free port and prints it.")

    @model_validator(mode="after")
    def _check(self) -> RolloutSettings:
        if self.weights_retry_max_s < self.weights_retry_base_s:
            raise ValueError("weights_retry_max_s must be >= weights_retry_base_s")
        return self

    def engine_config(self) -> EngineConfig:
        """The engine's own config, from the fields shared with EngineConfig."""
        return EngineConfig(**{name: getattr(self, name) for name in _ENGINE})
