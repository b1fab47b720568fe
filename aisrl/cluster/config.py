"""Settings of the local cluster (`aisrl up`): one YAML file, then `AISRL_UP_*` environment, then the command line.

Invariants: every key under `services.<name>` is a real field of that service's settings class and
not one the cluster sets itself (MANAGED_FIELDS), and its value is valid for that field; every key
under `model_init` is a field of `aisrl model init`'s settings. A bad key or value is an error that
names it (`services.learner.lrr: not a setting of the learner; did you mean lr?`), raised when
the settings are loaded, before anything starts. Importing this module imports no torch.
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aisrl.cluster.restarts import RestartSettings
from aisrl.models.config import WarmStartSettings
from aisrl.services.diagnostics.config import DiagnosticsSettings
from aisrl.services.learner.config import LearnerSettings
from aisrl.services.rollout.config import RolloutSettings
from aisrl.settings import NullableSettings, read_settings_file
from aisrl.streams import RUN_ID_PATTERN

SERVICE_SETTINGS: dict[str, type[BaseSettings]] = {
    "diagnostics": DiagnosticsSettings,
    "learner": LearnerSettings,
    "rollout": RolloutSettings,
}

# Fields the cluster sets from its own settings (ports, run, model, wiring): a `services:` override of
# one of them would silently disagree with the rest of the topology, so it is refused with a pointer.
MANAGED_FIELDS: dict[str, dict[str, str]] = {
    "diagnostics": {
        "redis_url": "redis_url", "http_host": "(loopback)", "http_port": "ports.diagnostics_http",
        "grpc_host": "(loopback)", "grpc_port": "ports.diagnostics_grpc", "log_json": "(always JSON lines)",
        "embedded_redis_dir": "redis_data_dir",
    },
    "learner": {
        "redis_url": "redis_url", "run_id": "run_id", "model_path": "model_dir", "task": "task",
        "task_options": "task_options", "max_steps": "steps", "work_dir": "(<out_dir>/<run_id>/learner)",
        "diagnostics_target": "ports.diagnostics_grpc", "http_host": "(loopback)", "http_port": "ports.learner_http",
        "grpc_host": "(loopback)", "grpc_port": "ports.learner_grpc", "log_json": "(always JSON lines)",
        "embedded_redis_dir": "redis_data_dir", "key_prefix": "key_prefix",
    },
    "rollout": {
        "redis_url": "redis_url", "run_id": "run_id", "model_path": "model_dir", "worker_id": "(rollout-<i>)",
        "work_dir": "(<out_dir>/<run_id>/rollout-<i>)", "http_host": "(loopback)",
        "http_port": "ports.rollout_http_base", "log_json": "(always JSON lines)", "key_prefix": "key_prefix",
    },
}  # fmt: skip
MANAGED_MODEL_INIT = {"task": "task", "task_options": "task_options", "out": "model_dir"}

_PORT = {"ge": 0, "le": 65535}


class SettingsError(ValueError):
    """Cluster settings that cannot be used; the message names the offending key."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def check_overrides(
    where: str, values: dict[str, Any], settings_cls: type[BaseSettings], managed: dict[str, str]
) -> dict[str, Any]:
    """Checks one override section against a settings class: known keys, not managed, valid values.

    Returns the section unchanged. Values are validated with the class's own validators (strings are
    accepted where the environment would give strings), without reading the environment.
    """
    fields = list(settings_cls.model_fields)
    for key in values:
        if key in managed:
            raise SettingsError(f"{where}.{key}: set by the cluster (use {managed[key]} instead)")
        if key not in fields:
            raise SettingsError(f"{where}.{key}: not a setting of {settings_cls.__name__}{_suggest(key, fields)}")
    try:
        settings_cls.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{where}.{'.'.join(str(p) for p in err['loc']) or '(section)'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(problems) from None
    return values


class PortSettings(BaseModel):
    """Ports on 127.0.0.1; 0 picks a free one when the cluster starts."""

    model_config = ConfigDict(extra="forbid")

    diagnostics_http: int = Field(0, **_PORT, description="Diagnostics REST API and dashboard (0: a free port).")
    diagnostics_grpc: int = Field(0, **_PORT, description="Diagnostics gRPC, used by the learner (0: a free port).")
    learner_http: int = Field(0, **_PORT, description="Learner /healthz, /readyz, /metrics, /status (0: free).")
    learner_grpc: int = Field(0, **_PORT, description="Learner Weights gRPC, used by rollouts (0: a free port).")
    rollout_http_base: int = Field(
        0, ge=0, le=65535 - 64, description="Rollout replica i serves HTTP on base + i (0: a free port each)."
    )


class ServiceOverrides(BaseModel):
    """Per service, settings passed to it as its environment variables (field names, e.g. `lr: 1e-5`)."""

    model_config = ConfigDict(extra="forbid")

    diagnostics: dict[str, Any] = Field(default_factory=dict, description="DiagnosticsSettings fields.")
    learner: dict[str, Any] = Field(default_factory=dict, description="LearnerSettings fields.")
    rollout: dict[str, Any] = Field(default_factory=dict, description="RolloutSettings fields (every replica).")

    @field_validator("diagnostics", "learner", "rollout")
    @classmethod
    def _check(cls, values: dict[str, Any], info: Any) -> dict[str, Any]:
        name = info.field_name
        return check_overrides(f"services.{name}", values, SERVICE_SETTINGS[name], MANAGED_FIELDS[name])


def default_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


class ClusterSettings(NullableSettings):
    """Start Redis, diagnostics, the learner and N rollout replicas on this machine and train until `steps`."""

    model_config = SettingsConfigDict(
        env_prefix="AISRL_UP_", env_nested_delimiter="__", extra="forbid", validate_default=True,
        populate_by_name=True,
    )  # fmt: skip

    run_id: str = Field(
        default_factory=default_run_id,
        pattern=RUN_ID_PATTERN,
        description="Run name (default: run-<date>-<time>). Reusing one resumes that run: the learner from its "
        "newest checkpoint in <out_dir>/<run_id>/learner, the rollouts rejoin the run's Redis streams and consumer "
        "groups (keep the same Redis: redis_url, or the embedded one's AOF in the run directory); the report covers "
        "the whole run.",
    )
    steps: int = Field(
        100,
        ge=1,
        le=10_000_000,
        description="Stop the cluster once the learner has taken this many steps in all (a resumed run counts the "
        "steps it already took: --steps 50 after 40 trains 10 more).",
    )
    replicas: int = Field(2, ge=1, le=64, description="Rollout replicas.")
    task: str = Field("countdown", min_length=1, description="Task to train on (aisrl.tasks).")
    task_options: dict[str, Any] = Field(default_factory=dict, description="Task options (learner and model init).")
    model_dir: str | None = Field(
        None,
        description="Initial policy, a Hugging Face checkpoint directory; created with `aisrl model init` when "
        "missing (unset: runs/models/<task>-tiny).",
    )
    model_init: dict[str, Any] = Field(
        default_factory=dict, description="Options of `aisrl model init` when the model is created (e.g. steps)."
    )
    out_dir: str = Field("runs", min_length=1, description="Runs go to <out_dir>/<run_id>/ (logs, report, plots).")
    key_prefix: str = Field("aisrl", min_length=1, description="Prefix of the run's Redis stream keys.")
    redis_url: str | None = Field(
        None,
        description="Redis to use (unset: an embedded one, kept with AOF in redis_data_dir).",
        validation_alias="AISRL_REDIS_URL",
    )
    redis_data_dir: str | None = Field(
        None, description="Embedded Redis data directory, AOF on (unset: <out_dir>/<run_id>/redis)."
    )
    baseline_eval: bool = Field(
        True, description="Evaluate the initial policy (step 0) with the learner's evaluator before training."
    )
    health_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="How long a service may take to become ready before the start fails."
    )
    stop_grace_s: float = Field(
        30.0, ge=0, le=3600, description="After SIGTERM, how long a child may take to exit before it is killed."
    )
    poll_s: float = Field(2.0, gt=0, le=600, description="Seconds between progress refreshes.")
    threads: dict[str, int] = Field(
        default_factory=dict,
        description="CPU threads per service (OMP_NUM_THREADS and torch), e.g. {learner: 2, rollout: 1}; "
        "unset: the libraries' defaults.",
    )
    ports: PortSettings = Field(default_factory=PortSettings, description="Ports (0: free ones).")
    restart: RestartSettings = Field(
        default_factory=RestartSettings,
        description="Restarts of crashed services (rollouts, diagnostics, the learner resuming from its checkpoint, "
        "the embedded Redis on its AOF) and the crash-loop limit that fails the run.",
    )
    services: ServiceOverrides = Field(default_factory=ServiceOverrides, description="Per-service setting overrides.")

    @field_validator("model_init")
    @classmethod
    def _check_model_init(cls, values: dict[str, Any]) -> dict[str, Any]:
        return check_overrides("model_init", values, WarmStartSettings, MANAGED_MODEL_INIT)

    @field_validator("threads")
    @classmethod
    def _check_threads(cls, values: dict[str, int]) -> dict[str, int]:
        for name, count in values.items():
            if name not in SERVICE_SETTINGS:
                raise SettingsError(f"threads.{name}: not a service{_suggest(name, list(SERVICE_SETTINGS))}")
            if not 1 <= count <= 1024:
                raise SettingsError(f"threads.{name}: must be between 1 and 1024, got {count}")
        return values

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_id

    @property
    def resolved_model_dir(self) -> Path:
        return Path(self.model_dir) if self.model_dir else Path(self.out_dir) / "models" / f"{self.task}-tiny"

    @property
    def resolved_redis_dir(self) -> Path:
        return Path(self.redis_data_dir) if self.redis_data_dir else self.run_dir / "redis"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a cluster YAML file holds; a clear error for a missing file or a non-mapping."""
    try:
        return read_settings_file(path)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def load_cluster_settings(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ClusterSettings:
    """Settings from the YAML file (if any), the environment, then explicit overrides (None values ignored).

    Raises SettingsError naming the bad key for anything invalid.
    """
    cls: type[ClusterSettings] = ClusterSettings
    if config is not None:
        read_yaml(config)  # clear errors before pydantic-settings reads it

        class FromFile(ClusterSettings):
            model_config = SettingsConfigDict(yaml_file=str(config))

        cls = FromFile
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if isinstance(err.get("ctx", {}).get("error"), SettingsError):
            problems.append(msg)  # already names its key
        elif err["type"] == "extra_forbidden":
            valid = list(ClusterSettings.model_fields) + list(PortSettings.model_fields) + list(SERVICE_SETTINGS)
            problems.append(f"{loc}: not a cluster setting{_suggest(str(err['loc'][-1]), valid)}")
        else:
            problems.append(f"{loc}: {msg}")
    return "; ".join(problems)
